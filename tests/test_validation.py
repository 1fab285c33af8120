"""Untrusted model files: config.json fields, tensor names/shapes/dtypes, GGUF tokenizer metadata,
chat templates and non-regular files each fail in one line naming the file and what is wrong."""
import json
import os
import shutil
import time

import gguf
import numpy as np
import pytest

from conftest import save_tiny_llama
from model import Config
from pipeline.api import load
from runtime.checkpoints.checkpoint import load_checkpoint, save_checkpoint
from runtime.errors import UserError
from runtime.checkpoints.packed_checkpoint import load_packed, save_packed
from pipeline.quantize_model import build_quantized
from pipeline.tags import parse_tag
from runtime.text.chat_template import BoundedTemplateEnvironment
from runtime.text.tokenizer import Tokenizer
from test_fuzz import write_tokenized_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama saved by transformers, and a packed (rtn4) model built from it."""
    root = tmp_path_factory.mktemp("validation")
    save_tiny_llama(root / "float", num_hidden_layers=2, max_position_embeddings=32)
    build_quantized(root / "float", parse_tag("rtn4"), root / "packed", progress=False)
    return root


def with_config(tiny, tmp_path, **changes):
    """A copy of the float model whose config.json has `changes` (None deletes the key)."""
    shutil.copytree(tiny / "float", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    return tmp_path / "m"


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": None}, "field 'hidden_size' is missing"),
    ({"vocab_size": None}, "field 'vocab_size' is missing"),
    ({"hidden_size": "16"}, "field 'hidden_size' is '16', but it must be a positive integer"),
    ({"num_attention_heads": 0}, "field 'num_attention_heads' is 0, but it must be a positive integer"),
    ({"intermediate_size": -4}, "field 'intermediate_size' is -4"),
    ({"num_hidden_layers": 3}, "num_hidden_layers is 3, but .* holds tensors of 2 layers"),
    ({"num_hidden_layers": 2 ** 63}, "num_hidden_layers is 9223372036854775808"),
    ({"eos_token_id": ["x"]}, "field 'eos_token_id' is \\['x'\\], but it must be a token id"),
    ({"eos_token_id": 32000}, "field 'eos_token_id' is 32000, outside the vocabulary of 32000"),
    ({"max_position_embeddings": -1}, "field 'max_position_embeddings' is -1"),
    ({"rms_norm_eps": float("nan")}, "field 'rms_norm_eps' is nan, but it must be a positive finite number"),
    ({"num_attention_heads": 3}, "num_attention_heads' is 3, which does not divide hidden_size 16"),
    ({"num_key_value_heads": 2, "num_attention_heads": 1}, "num_key_value_heads' is 2, which does not divide"),
    ({"tie_word_embeddings": "yes"}, "field 'tie_word_embeddings' is 'yes', but it must be true or false"),
    ({"architectures": "Llama"}, "field 'architectures' is 'Llama', but it must be a list"),
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
])
def test_bad_config_fields_name_the_file_and_field(tiny, tmp_path, changes, message):
    path = with_config(tiny, tmp_path, **changes)
    with pytest.raises(UserError, match=message) as error:
        load(str(path))
    assert "\n" not in str(error.value) and "config.json" in str(error.value)


def test_config_from_hf_checks_its_dict_once_through_the_schema():
    with pytest.raises(UserError, match="my.json: field 'num_attention_heads' is 0"):
        Config.from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
                        "num_attention_heads": 0, "intermediate_size": 8}, "my.json")
    with pytest.raises(UserError, match="field 'ffn_dim' is missing"):
        Config.from_hf({"model_type": "opt", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
                        "num_attention_heads": 2})


def edited_float(tiny, tmp_path, edit):
    """A copy of the float model whose tensors are changed by `edit(tensors)` and saved again."""
    config, tensors = load_checkpoint(tiny / "float")
    tensors = dict(tensors)
    edit(tensors)
    shutil.copytree(tiny / "float", tmp_path / "m")
    save_checkpoint(tmp_path / "m", config, tensors)
    return tmp_path / "m"


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "lacks tensor 'model.layers.1.mlp.up_proj.weight'"),
    (lambda t: t.update(extra=np.zeros(3, np.float32)), "holds tensor 'extra', which .*config.json does not"),
    (lambda t: t.update({"model.layers.0.mlp.upproj.weight": t.pop("model.layers.0.mlp.up_proj.weight")}),
     "lacks tensor 'model.layers.0.mlp.up_proj.weight'"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"].reshape(16, 32)}),
     r"'model.layers.0.mlp.up_proj.weight' has shape \(16, 32\), but .*config.json implies \(32, 16\)"),
    (lambda t: t.update({"model.norm.weight": np.ones(16, np.int32)}), "'model.norm.weight' is int32, but a float"),
])
def test_tensors_that_disagree_with_the_config_fail_at_load(tiny, tmp_path, edit, message):
    path = edited_float(tiny, tmp_path, edit)
    with pytest.raises(UserError, match=message):
        load_checkpoint(path)


def test_packed_embedding_of_the_wrong_shape_fails_at_load(tiny, tmp_path):
    config, tensors = load_packed(tiny / "packed")
    embed = np.asarray(tensors["model.embed_tokens.weight"])
    save_packed(tmp_path, config, {**tensors, "model.embed_tokens.weight": embed.reshape(16, -1)})
    with pytest.raises(UserError, match=r"'model.embed_tokens.weight' has shape \(16, 32000\)"):
        load_packed(tmp_path)


def write_gguf_with(path, small, edit):
    """The fuzz test's tokenized GGUF of `small`, with its metadata changed by `edit(writer)` after the rest."""
    write_tokenized_gguf(path, small)
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(path.with_name("edited.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        value = field.contents()
        if field.name in edit:
            value = edit[field.name]
            if value is None:
                continue
        kind = field.types[0] if not isinstance(edit.get(field.name), bytes) else gguf.GGUFValueType.STRING
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        if isinstance(edit.get(field.name), list) and edit[field.name] and isinstance(edit[field.name][0], int):
            sub = gguf.GGUFValueType.INT32
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for name in edit.keys() - reader.fields.keys():  # keys the original did not write
        writer.add_array(name, edit[name])
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data).reshape(tuple(reversed(tensor.shape.tolist()))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.with_name("edited.gguf")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("small") / "m", vocab_size=257, num_hidden_layers=1,
                           max_position_embeddings=32)


@pytest.mark.parametrize("edit, message", [
    ({"tokenizer.chat_template": b"\xff\xfe"}, "'tokenizer.chat_template' is not valid UTF-8"),
    ({"tokenizer.ggml.eos_token_id": 999}, "eos_token_id is 999, outside the vocabulary of 257"),
    ({"tokenizer.ggml.merges": [1, 2]}, "'tokenizer.ggml.merges' must be an array of strings"),
    ({"tokenizer.ggml.merges": ["a zz"]}, "merges holds 'a zz', not two tokens of the vocabulary"),
    ({"tokenizer.ggml.token_type": [1, 1]}, "token_type has 2 entries for 257 tokens"),
])
def test_damaged_gguf_tokenizer_metadata_fails_in_one_line(small, tmp_path, edit, message):
    path = write_gguf_with(tmp_path / "tiny.gguf", small, edit)
    with pytest.raises(UserError, match=message):
        Tokenizer.load(path)


def test_chat_templates_are_bounded_in_time_and_size():
    env = BoundedTemplateEnvironment()
    start = time.monotonic()
    with pytest.raises(UserError, match="ran longer than 2 s"):
        env.render_bounded("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    assert time.monotonic() - start < 5
    for source, message in [("{{ 'a' * 10**12 }}", "repeats a value"), ("{{ 'a'.center(10**12) }}", "passes a number"),
                            ("{{ 7 ** 1000000000 }}", "computes a power"),
                            ("{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}"
                             "{% endfor %}", "builds a value"),
                            ("{% for i in range(100000) %}{{ 'abcdefghijklmnopqrstuvwxyz' }}{% endfor %}", "writes more")]:
        with pytest.raises(UserError, match=message):
            env.render_bounded(source)
    assert env.render_bounded("{{ m }}!", m="hi") == "hi!"


@pytest.mark.parametrize("where", ["model.gguf", "model.safetensors", "config.json", "directory-as-model"])
def test_fifos_are_refused_without_blocking(tiny, tmp_path, where):
    if where == "model.gguf":
        os.mkfifo(tmp_path / "x.gguf")
        target = tmp_path / "x.gguf"
    else:
        shutil.copytree(tiny / "float", tmp_path / "m")
        target = tmp_path / "m"
        if where != "directory-as-model":
            (target / where).unlink()
            os.mkfifo(target / where)
        else:
            target = target / "model.safetensors"
            target.unlink()
            os.mkfifo(target)
    with pytest.raises(UserError, match="is not a regular file"):
        load(str(target))
    with pytest.raises(UserError, match="is not a regular file"):
        load_checkpoint("/dev/zero")
