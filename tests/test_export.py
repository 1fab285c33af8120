"""Tests of runtime/export and quantize.py --export: GPTQ checkpoints and GGUF files of our uniform models.

GPTQ: the export reloaded by runtime/importers gives the same tensors, and
transformers parses its quantization_config (loading the weights in
transformers needs optimum or gptqmodel with their kernels, not installed
here). GGUF: the `gguf` package's own dequantization of the written blocks
equals our weights (Q4_0 exactly, Q4_1 within fp16 rounding of m, Q8_0
exactly for symmetric codes), our loader reads the file back, and
llama-cpp-python (when installed) loads it, generates, and gives the perplexity
our runtime gives on our model (bench_llamacpp.py's perplexity, the
benchmark's own llama.cpp code path).
"""
import json
import subprocess
import sys

import gguf
import numpy as np
import pytest

from bench_llamacpp import perplexity as llama_cpp_perplexity
from conftest import ROOT, save_tiny_llama
from runtime.errors import UserError
from runtime.checkpoints.export import export_model
from runtime.formats.uniform import UniformTensor
from runtime.checkpoints.rope_layout import interleaved_to_half_split
from runtime.checkpoints.importers import load_quantized_checkpoint
from runtime.checkpoints.packed_checkpoint import load_packed, save_packed
from pipeline.perplexity import perplexity, windows_of
from pipeline.quantize_model import build_quantized
from pipeline.tags import parse_tag

SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    save_tiny_llama(path, **SHAPE)
    return path


def built(base, tmp_path, tag):
    return build_quantized(base, parse_tag(tag), tmp_path / tag, progress=False)


def gguf_weights(path) -> dict:
    """{GGUF name: (type, float32 array in HF row order)} read back with the gguf package's dequantize."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
        heads = 4 if ".attn_q." in t.name else 2 if ".attn_k." in t.name else 0
        out[t.name] = (t.tensor_type, interleaved_to_half_split(w, heads) if heads else w)
    return out


@pytest.mark.parametrize("tag,kind,exact", [("rtn4g32sym", "Q4_0", True), ("rtn4g32", "Q4_1", False),
                                            ("rtn4g64sym", "Q4_0", True), ("rtn8g32sym", "Q8_0", True)])
def test_gguf_blocks_dequantize_to_our_weights(base, tmp_path, tag, kind, exact):
    model = built(base, tmp_path, tag)
    out = export_model(model, "gguf")
    assert out == tmp_path / f"{tag}.gguf"
    _, tensors = load_packed(model)
    read = gguf_weights(out)
    ours = tensors["model.layers.0.self_attn.q_proj.weight"].dequantize()
    kind_read, theirs = read["blk.0.attn_q.weight"]
    assert kind_read.name == kind
    if exact:
        np.testing.assert_array_equal(theirs, ours)
    else:
        scale = np.abs(ours).max()
        np.testing.assert_allclose(theirs, ours, atol=scale * 2.0**-10, rtol=0)  # m = -d*zero in fp16
    for name, value in tensors.items():
        if name.startswith("model.layers.0.mlp"):
            np.testing.assert_allclose(read["blk.0.ffn_" + name.split(".")[-2].split("_")[0] + ".weight"][1],
                                       value.dequantize(), atol=np.abs(value.dequantize()).max() * 2.0**-10, rtol=0)
    assert read["output.weight"][0].name == "Q8_0"
    np.testing.assert_array_equal(read["output.weight"][1], tensors["lm_head.weight"].dequantize())


def test_gguf_export_loads_in_our_runtime_and_llama_cpp(base, tmp_path):
    from pipeline.api import load_model
    model = built(base, tmp_path, "rtn4g32sym")
    out = export_model(model, "gguf")
    ids = [1, 450, 4996, 17354, 1701, 29916]
    logits = [m.prefill(ids, m.new_cache(len(ids)), all_logits=True) for m in (load_model(model), load_model(out))]
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-3, rtol=0)  # same weights, float16 embedding
    from runtime.text.tokenizer import Tokenizer
    text = "The cat sat on the mat, 1314 times."
    assert Tokenizer.load(out).encode(text) == Tokenizer.load(model).encode(text)  # the embedded vocabulary
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=32, verbose=False)
    result = llm("The cat", max_tokens=4, temperature=0)
    assert result["usage"]["completion_tokens"] >= 1


PPL_SEQLEN, PPL_WINDOWS = 48, 4
PPL_TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
            "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction, "
            "the Eiffel Tower surpassed the Washington Monument to become the tallest man-made structure in the "
            "world, a title it held for 41 years until the Chrysler Building in New York City was finished in 1930. ")


@pytest.fixture(scope="module")
def sharp_base(tmp_path_factory):
    """A random Llama whose weights are large enough (initializer_range 0.15) that its logits are far from
    uniform, so a perplexity that ignored a layer would show; room for the perplexity windows."""
    path = tmp_path_factory.mktemp("sharp")
    save_tiny_llama(path, **SHAPE, num_hidden_layers=2, initializer_range=0.15, max_position_embeddings=64)
    return path


@pytest.mark.parametrize("tag,kind", [("rtn4g32sym", "Q4_0"), ("rtn4g32", "Q4_1")])
def test_gguf_export_perplexity_in_llama_cpp_matches_ours(sharp_base, tmp_path, tag, kind):
    pytest.importorskip("llama_cpp")
    from pipeline.api import load
    model = built(sharp_base, tmp_path, tag)
    out = export_model(model, "gguf")
    assert gguf_weights(out)["blk.0.attn_q.weight"][0].name == kind
    llm = load(str(model))
    ids = llm.tokenizer.encode(PPL_TEXT * 4)
    ours = perplexity(llm.model, ids, PPL_SEQLEN, PPL_WINDOWS, progress=False)
    assert ours["windows"] == PPL_WINDOWS
    windows = np.asarray(windows_of(ids, PPL_SEQLEN, PPL_WINDOWS), np.int32)  # [windows, seqlen]
    np.save(tmp_path / "windows.npy", windows)
    theirs = llama_cpp_perplexity(str(out), str(tmp_path / "windows.npy"), threads=2)
    assert theirs["count"] == ours["tokens"]
    assert abs(np.log(ours["ppl"] / 32000)) > 0.1  # far from uniform logits: the weights decide it
    assert theirs["ppl"] == pytest.approx(ours["ppl"], rel=0.005)


@pytest.mark.parametrize("tag", ["rtn3g32", "rtn2g64", "nf4"])
def test_gguf_refuses_other_configurations(base, tmp_path, tag):
    model = built(base, tmp_path, tag)
    with pytest.raises(UserError, match="cannot be written as GGUF; exportable are") as error:
        export_model(model, "gguf")
    assert "\n" not in str(error.value)


def act_order_model(base, tmp_path, bits: int) -> object:
    """A uniform model with random codes in act-order (GPTQ's desc_act) and zero points from 0 up."""
    model = built(base, tmp_path, f"rtn{bits}g32")
    config, tensors = load_packed(model)
    rng = np.random.default_rng(bits)
    for name, value in list(tensors.items()):
        if isinstance(value, UniformTensor) and name != "lm_head.weight":
            n_out, n_in = value.shape
            g_idx = np.empty(n_in, np.int32)
            g_idx[rng.permutation(n_in)] = np.arange(n_in) // 32
            groups = n_in // 32
            tensors[name] = UniformTensor.from_codes(
                rng.integers(0, 1 << bits, (n_out, n_in)), rng.uniform(0.01, 0.02, (groups, n_out)),
                rng.integers(1, 1 << bits, (groups, n_out)), bits=bits, group_size=32, sym=False, g_idx=g_idx)
    out = tmp_path / f"act{bits}"
    out.mkdir()
    save_packed(out, config, tensors)
    (out / "tokenizer.model").write_bytes((model / "tokenizer.model").read_bytes()) if (
        model / "tokenizer.model").exists() else None
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_export_round_trips(base, tmp_path, bits):
    import transformers
    model = act_order_model(base, tmp_path, bits)
    out = export_model(model, "gptq")
    settings = json.loads((out / "config.json").read_text())["quantization_config"]
    assert settings["checkpoint_format"] == "gptq" and settings["desc_act"] and settings["bits"] == bits
    parsed = transformers.GPTQConfig.from_dict(settings)  # transformers accepts the config
    assert parsed.bits == bits and parsed.group_size == 32 and parsed.desc_act
    transformers.AutoConfig.from_pretrained(out)
    _, ours = load_packed(model)
    _, back = load_quantized_checkpoint(out)
    for name, value in ours.items():
        if isinstance(value, UniformTensor) and name != "lm_head.weight":
            np.testing.assert_array_equal(back[name].dequantize(), value.dequantize())
            np.testing.assert_array_equal(back[name].g_idx, value.g_idx)
    np.testing.assert_allclose(back["lm_head.weight"], ours["lm_head.weight"].dequantize(), rtol=2.0**-10, atol=0)


def test_gptq_export_of_zero_points_of_zero_is_v2(base, tmp_path, capsys):
    model = built(base, tmp_path, "rtn4g32")
    _, tensors = load_packed(model)
    out = export_model(model, "gptq")
    fmt = json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"]
    from runtime.formats.uniform import unpack
    has_zero = any((unpack(np.ascontiguousarray(t.qzeros.T), 4, t.out_features) == 0).any()
                   for n, t in tensors.items() if isinstance(t, UniformTensor) and n != "lm_head.weight")
    assert fmt == ("gptq_v2" if has_zero else "gptq")
    _, back = load_quantized_checkpoint(out)
    np.testing.assert_array_equal(back["model.layers.0.mlp.up_proj.weight"].dequantize(),
                                  tensors["model.layers.0.mlp.up_proj.weight"].dequantize())


def test_gptq_export_refuses_other_formats_and_busy_destinations(base, tmp_path):
    with pytest.raises(UserError, match="which GPTQ cannot hold; exportable are uniform-format models"):
        export_model(built(base, tmp_path, "nf4"), "gptq")
    model = built(base, tmp_path, "rtn4g32sym")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(UserError, match="already exists"):
        export_model(model, "gptq", tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "keep"


def test_quantize_cli_export(base, tmp_path):
    out = tmp_path / "q"
    command = [sys.executable, str(ROOT / "quantize.py"), "--model", str(base), "--method", "rtn", "--bits", "4",
               "--group", "32", "--sym", "--out", str(out)]
    first = subprocess.run(command + ["--export", "gguf"], capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "q.gguf").is_file() and "exported" in first.stdout
    second = subprocess.run(command + ["--export", "gptq"], capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0, second.stderr  # the model built above is exported, not rebuilt
    assert "quantizing" not in second.stderr and (tmp_path / "q-gptq" / "model.safetensors").is_file()
    again = subprocess.run(command + ["--export", "gptq"], capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
