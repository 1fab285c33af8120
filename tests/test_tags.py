"""The tag grammar of quantized model names, and the errors for names that resolve to nothing."""
import numpy as np
import pytest

from runtime.errors import UserError
from pipeline.first_use import split_quantized_name
from runtime.hub.resolve import DEFAULT_MODEL, resolve_model
from pipeline.tags import parse_tag


@pytest.mark.parametrize("tag,method,bits,group,options", [
    ("rtn4g128", "rtn", 4, 128, set()), ("rtn4", "rtn", 4, 0, set()), ("rtn3g64sym", "rtn", 3, 64, {"sym"}),
    ("rtn2g64mse", "rtn", 2, 64, {"mse"}), ("rtn8tensor", "rtn", 8, 0, {"tensor"}),
    ("rtn4g32symmse", "rtn", 4, 32, {"sym", "mse"}), ("nf4", "nf", 4, 0, set()), ("nf4dq", "nf", 4, 0, {"dq"}),
    ("fp4g128", "fp", 4, 128, set()), ("int8", "int", 8, 0, set()), ("absmax8", "absmax", 8, 0, set()),
    ("smooth8", "smooth", 8, 0, set()), ("spqr3", "spqr", 3, 0, set()), ("spqr3dense", "spqr", 3, 0, {"dense"}),
    ("quip2", "quip", 2, 0, set()), ("int8t150", "int", 8, 0, set()), ("quipsharp4", "quipsharp", 4, 0, set())])
def test_valid_tags_parse_and_print_back(tag, method, bits, group, options):
    spec = parse_tag(tag)
    assert (spec.method, spec.bits, spec.group_size, spec.options) == (method, bits, group, options)
    assert spec.tag == tag


def test_numeric_options_parse_and_print_in_canonical_order():
    spec = parse_tag("spqr4g16t35s16")
    assert (spec.method, spec.bits, spec.group_size, spec.values) == ("spqr", 4, 16, {"s": 16, "t": 35})
    assert spec.tag == "spqr4g16s16t35"


@pytest.mark.parametrize("short,full", [("q2", "quipsharp2"), ("q3", "quipsharp3"), ("q4", "quipsharp4")])
def test_short_tags_name_the_full_tag(short, full):
    assert parse_tag(short).tag == full


@pytest.mark.parametrize("tag,message", [
    ("q9", "unknown short tag"), ("spqr3s9", "must be one of"), ("spqr3denset20", "either a positive"),
    ("spqr3t0", "either a positive"), ("quip2g64", "takes no group size"), ("rtn4t20", "takes the options"),
    ("absmax8t150", "takes no options"),
    ("spqr4g24", "multiple of 16"), ("quipsharp8", "supports 2, 3, 4"),
    ("foo4", "unknown quantization tag"), ("rtn5", "supports 2, 3, 4, 8"),
    ("rtn4g100", "multiple of 32"), ("rtn4g128tensor", "exclude each other"), ("rtn4g128xyz", "unknown"),
    ("nf3", "supports 4"), ("nf4sym", "takes the options dq"), ("rtn4dq", "takes the options"),
    ("nf4g12", "multiple of 8"), ("int8g128", "takes no group size"), ("int4", "supports 8")])
def test_invalid_tags_explain_the_grammar(tag, message):
    with pytest.raises(UserError, match=message):
        parse_tag(tag)


def test_unknown_tag_lists_valid_forms():
    with pytest.raises(UserError, match="rtn4g128"):
        parse_tag("awq4")


def test_split_quantized_name():
    assert split_quantized_name("smollm2-135m.rtn4g128") == ("smollm2-135m", "rtn4g128")
    assert split_quantized_name("smollm2-135m") is None
    assert split_quantized_name("models/x.y/z") is None


def test_empty_tag_lists_the_tag_forms():
    with pytest.raises(UserError, match=r"the quantization tag is empty: valid tags are METHOD BITS .*q2, q3, q4"):
        parse_tag("")


@pytest.mark.parametrize("name", ["smollm2-135m.", "opt-1.3b.", "models/other."])
def test_name_with_an_empty_tag_says_so(tmp_path, name):
    """Not "the default model is not built" (the old message for smollm2-135m.): the tag is what is missing."""
    with pytest.raises(UserError, match=r"has an empty quantization tag after the '\.': write BASE .*rtn4g128"):
        resolve_model(name, tmp_path)


def test_default_model_message_only_when_it_is_missing(tmp_path):
    with pytest.raises(UserError, match="the default model is not built yet"):
        resolve_model(DEFAULT_MODEL, tmp_path)
    (tmp_path / DEFAULT_MODEL).mkdir()
    (tmp_path / DEFAULT_MODEL / "config.json").write_text("{}")
    with pytest.raises(UserError, match=rf"model '{DEFAULT_MODEL}\.x\.y' not found: .*available: {DEFAULT_MODEL}"):
        resolve_model(f"{DEFAULT_MODEL}.x.y", tmp_path)


def test_defaults_are_read_from_the_method_declarations(monkeypatch, capsys):
    """Each method's defaults live in its own file: with every declared default changed there (to 977),
    quantize.py's help and the build driver show and use the changed value, and neither they nor the
    tag parser restate a default (SpQR's tau 0.2 and LLM.int8's 6.0 used to appear in three places)."""
    import dataclasses
    import importlib
    from pathlib import Path

    import quantize
    from pipeline.quantize_model import calibrated_method, quantize_weight
    from pipeline.tags import METHOD_MODULES, contracts

    def changed(contract):
        fields = [o.field for o in contract.options if o.field] + [contract.group_field] * bool(contract.group_field)
        return dataclasses.replace(contract, quantize=lambda *args: args[-1], params=lambda spec: dataclasses.replace(
            contract.params(spec), **{name: 977 for name in fields}))

    for module in map(importlib.import_module, METHOD_MODULES):
        monkeypatch.setattr(module, "CONTRACTS", tuple(map(changed, module.CONTRACTS)))
    with pytest.raises(SystemExit):
        quantize.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    known = contracts().values()
    assert help_text.count("(default 977)") == sum(bool(o.field) for c in known for o in c.options)
    for contract in known:
        if contract.group_multiple:
            assert f"{contract.name}: a multiple of {contract.group_multiple}, default 977" in help_text
        spec = contract.spec(contract.bits[0])
        params = (calibrated_method(spec)([], [], None) if contract.calibration == "hessian"
                  else quantize_weight(np.zeros((1, 8)), spec))
        assert all(getattr(params, o.field) == 977 for o in contract.options if o.field)
    root = Path(__file__).parent.parent
    for path in ("pipeline/tags.py", "pipeline/quantize_model.py", "quantize.py"):
        source = (root / path).read_text()
        assert "0.2" not in source and "6.0" not in source and "t20" not in source, path
