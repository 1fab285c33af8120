"""Building a saved quantized model with every calibrated method (pipeline/quantize_model.py), then loading it.

A tiny random HF Llama (hidden 64, MLP 96 = 12·8, so QuIP#'s Hadamard and
E8P blocks fit) is quantized through `build_quantized` on a few windows of
the real calibration text. The references: each packed tensor's own NumPy
`dequantize` (the model run on those float weights must give the logits the
packed kernels give) and the bytes the saved tensors hold (bits per weight).
"""
import json

import numpy as np
import pytest

from conftest import TWO_LAYER_LLAMA, save_tiny_llama
from model import Config, Model
from pipeline.calibration import CalibrationSettings
from runtime.formats.base import PackedTensor
from runtime.checkpoints.packed_checkpoint import load_packed
from pipeline.quantize_model import build_quantized, projection_names
from pipeline.tags import parse_tag

FORMATS = {"spqr3": "spqr", "spqr4g32s16dense": "spqr", "quip2": "incoherent", "quipsharp2": "e8p",
           "quipsharp3": "e8p", "gptq3g32": "uniform"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("quantize") / "base"
    save_tiny_llama(path, **TWO_LAYER_LLAMA, intermediate_size=96, max_position_embeddings=32)
    return path


@pytest.mark.parametrize("tag", sorted(FORMATS))
def test_calibrated_build_saves_loads_and_runs(base, tag):
    out = base.with_name(f"base.{tag}")
    build_quantized(base, parse_tag(tag), out, progress=False,
                    calibration=CalibrationSettings(nsamples=2, seqlen=24, seed=0))
    hf_config, tensors = load_packed(out)
    config = Config.from_hf(hf_config)
    names = projection_names(config)
    assert all(isinstance(tensors[n], PackedTensor) and tensors[n].FORMAT == FORMATS[tag] for n in names)

    record = json.loads((out / "config.json").read_text())["quantization"]
    stored_bits = sum(8 * tensors[n].nbytes for n in names) / sum(np.prod(tensors[n].shape) for n in names)
    assert record["tag"] == parse_tag(tag).tag and record["bits_per_weight"] == pytest.approx(stored_bits, abs=1e-4)
    assert record["proxy_loss"]["linears"] == len(names) and record["proxy_loss"]["ratio_mean"] > 0

    ids = np.arange(3, 19)
    packed_model = Model(config, tensors)
    float_model = Model(config, {**tensors, **{n: tensors[n].dequantize() for n in names}})
    logits = packed_model.prefill(ids, packed_model.new_cache(len(ids)), all_logits=True)  # [T, vocab]
    reference = float_model.prefill(ids, float_model.new_cache(len(ids)), all_logits=True)  # [T, vocab]
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-4 * float(np.abs(reference).max()))


@pytest.mark.parametrize("tag,threshold", [("int8", 6.0), ("int8t150", 1.5), ("smooth8", None)])
def test_int8_tags_set_the_outlier_threshold(tag, threshold):
    from pipeline.quantize_model import quantize_weight
    W = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    assert quantize_weight(W, parse_tag(tag)).outlier_threshold == threshold


def test_build_releases_each_float_projection_and_reads_it_back(base, monkeypatch):
    """RTN's build hands each projection's mapped float pages back to the OS once it is packed (peak RSS about
    the packed model, not the float checkpoint); the weights still read back from the file unchanged."""
    from pipeline import quantize_model
    from runtime.checkpoints.checkpoint import load_checkpoint

    hf_config, tensors = load_checkpoint(base)
    config = Config.from_hf(hf_config)
    names = projection_names(config)
    before = {name: np.array(tensors[name]) for name in names}
    released = []
    release = quantize_model.release_pages
    monkeypatch.setattr(quantize_model, "release_pages", lambda a: released.append(a) or release(a))
    out = quantize_model.quantize_tensors(config, tensors, parse_tag("rtn4g32"), progress=False)
    assert len(released) == len(names) and all(isinstance(out[name], PackedTensor) for name in names)
    for name in names:
        np.testing.assert_array_equal(tensors[name], before[name])
