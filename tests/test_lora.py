"""LoRA adapters (runtime/lora.py) against PEFT and HF transformers on tiny random models.

The oracle: a PEFT LoRA adapter on a tiny random HF model, merged with PEFT's
`merge_and_unload`; its logits are what the base plus the adapter must give.
lora_B is zero at PEFT's initialization (the adapter would be a no-op), so the
tests fill it with random values under a fixed seed.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, save_tiny_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import nf4  # noqa: E402
from model import Config, Model  # noqa: E402
from pipeline.api import load, token_logprobs  # noqa: E402
from runtime.checkpoints.checkpoint import load_checkpoint  # noqa: E402
from runtime.errors import UserError  # noqa: E402
from runtime.lora import LoraWeight, apply_lora, load_adapter, merge_lora  # noqa: E402
from runtime.checkpoints.safetensors_io import read_safetensors, write_safetensors  # noqa: E402

TOLERANCE = 1e-4  # float32 forward passes that differ only in summation order
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
IDS = np.random.default_rng(1).integers(0, 120, 16)  # the test prompt, as token ids


def tiny_llama(hidden: int = 64, layers: int = 2):
    """A random Llama with GQA (4 heads, 2 kv heads); in-features are multiples of NF4's block of 64."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=120,
                                      max_position_embeddings=64, initializer_range=0.1)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_opt():
    torch.manual_seed(0)
    config = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=120, max_position_embeddings=64, initializer_range=0.1)
    return transformers.OPTForCausalLM(config).eval()


def make_adapter(hf_model, targets, path, **options):
    """Wrap `hf_model` in a PEFT LoRA (r=8, alpha=16), randomize lora_B (seed 2), save it to `path`.

    Returns the PEFT model (still unmerged)."""
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, **options)
    peft_model = peft.get_peft_model(hf_model, config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(path)
    return peft_model


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)[None]).logits[0].float().numpy()  # [T, vocab]


def rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def our_logits(path_or_config, tensors=None, decode_from: int = 10) -> np.ndarray:
    """Our logits for IDS: prefill of the first `decode_from` tokens, then one decode step per token."""
    config = Config.from_hf(path_or_config)
    model = Model(config, tensors)
    cache = model.new_cache(32)
    logits = [model.prefill(IDS[:decode_from], cache, all_logits=True)]  # [decode_from, vocab]
    logits += [model.decode(int(t), cache)[None] for t in IDS[decode_from:]]  # [1, vocab] each
    return np.concatenate(logits)  # [T, vocab]


def build_case(family: str, tmp_path, **options):
    """Save a tiny base and a LoRA adapter for it; return (base dir, adapter dir, base logits, merged logits)."""
    hf_model, targets = (tiny_llama(), LLAMA_TARGETS) if family == "llama" else (tiny_opt(), OPT_TARGETS)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    hf_model.save_pretrained(base_dir)
    base = hf_logits(hf_model)
    merged = hf_logits(make_adapter(hf_model, targets, adapter_dir, **options).merge_and_unload())
    return base_dir, adapter_dir, base, merged


@pytest.fixture(scope="module")
def llama_case(tmp_path_factory):
    return build_case("llama", tmp_path_factory.mktemp("llama"))


def test_adapter_is_read_as_peft_wrote_it(llama_case):
    _, adapter_dir, _, _ = llama_case
    adapter = load_adapter(adapter_dir)
    assert len(adapter.factors) == 2 * len(LLAMA_TARGETS)
    f = adapter.factors["model.layers.1.mlp.down_proj.weight"]
    assert f.A.shape == (8, 128) and f.B.shape == (64, 8)
    assert f.scale == 16 / 8  # lora_alpha / r


@pytest.mark.parametrize("family,options", [("llama", {}), ("llama", {"use_rslora": True}), ("opt", {})],
                         ids=["llama", "llama-rslora", "opt"])
def test_run_time_adapter_matches_peft_merge(family, options, tmp_path):
    base_dir, adapter_dir, base, merged = build_case(family, tmp_path, **options)
    assert np.abs(merged - base).max() > 0.1, "the adapter must change the logits for the test to mean anything"
    config, tensors = load_checkpoint(base_dir)
    with_lora = apply_lora(tensors, load_adapter(adapter_dir))
    assert isinstance(with_lora["model.layers.0.self_attn.q_proj.weight" if family == "llama"
                                else "model.decoder.layers.0.fc1.weight"], LoraWeight)
    assert np.abs(our_logits(config, with_lora) - merged).max() < TOLERANCE


def test_merge_lora_matches_peft_merge(llama_case, tmp_path):
    base_dir, adapter_dir, _, merged = llama_case
    config, tensors = load_checkpoint(base_dir)
    merged_tensors = merge_lora(tensors, load_adapter(adapter_dir))
    assert merged_tensors["model.layers.0.mlp.up_proj.weight"].dtype == np.float32
    assert np.abs(our_logits(config, merged_tensors) - merged).max() < TOLERANCE


def test_nf4_base_with_adapter(llama_case, monkeypatch):
    """QLoRA inference: NF4 base weights, the float adapter run beside them.

    1. Exactness: the run-time LoraWeight over an NF4 weight equals merging the adapter into the
       dequantized NF4 weight (W_nf4 + s B A), within float32 tolerance (float activations: the int8
       decode kernel rounds the activations, tests/test_lut4_int8_kernels.py).
    2. Accuracy: against the float merged model the only error left is NF4's rounding of W (the
       adapter runs in float32), so its RMS over the logits must be about the NF4 base's own RMS
       error against the float base (measured: 0.217 vs 0.200; we allow 1.5x), and well under the
       adapter's own effect on the logits (RMS 0.88; we allow half), so the fine-tuning survives.
    """
    monkeypatch.setenv("QLLM_ACTIVATIONS", "float")
    base_dir, adapter_dir, base, merged = llama_case
    config, tensors = load_checkpoint(base_dir)
    adapter = load_adapter(adapter_dir)
    packed = {name: nf4.quantize(w) if name in adapter.factors else w for name, w in tensors.items()}
    qlora = our_logits(config, apply_lora(packed, adapter))
    dequantized = {name: w.dequantize() if name in adapter.factors else w for name, w in packed.items()}
    assert np.abs(qlora - our_logits(config, merge_lora(dequantized, adapter))).max() < TOLERANCE

    nf4_base_error = rms(our_logits(config, packed) - base)
    qlora_error = rms(qlora - merged)
    assert 0 < qlora_error < 1.5 * nf4_base_error
    assert qlora_error < 0.5 * rms(merged - base)


def test_lora_weight_moves_with_its_base(llama_case):
    base_dir, adapter_dir, _, _ = llama_case
    _, tensors = load_checkpoint(base_dir)
    name = "model.layers.0.mlp.gate_proj.weight"
    weight = apply_lora(dict(tensors, **{name: nf4.quantize(tensors[name])}), load_adapter(adapter_dir))[name]
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)  # [T, in]
    assert weight.shape == (128, 64)
    assert np.array_equal(weight.to_device(np).matmul(x), weight.matmul(x))


def test_merge_refuses_packed_weights(llama_case):
    base_dir, adapter_dir, _, _ = llama_case
    _, tensors = load_checkpoint(base_dir)
    packed = dict(tensors, **{"model.layers.0.self_attn.q_proj.weight":
                              nf4.quantize(tensors["model.layers.0.self_attn.q_proj.weight"])})
    with pytest.raises(UserError, match="apply the adapter at run time"):
        merge_lora(packed, load_adapter(adapter_dir))


def test_adapter_for_another_hidden_size_is_refused(llama_case, tmp_path):
    base_dir, _, _, _ = llama_case
    make_adapter(tiny_llama(hidden=32), LLAMA_TARGETS, tmp_path / "other")
    _, tensors = load_checkpoint(base_dir)
    with pytest.raises(UserError, match=r"does not fit this model: model\.layers\.0\.\S+ is \[\d+, \d+\] "
                                        r"but the adapter's update is \[\d+, \d+\]"):
        apply_lora(tensors, load_adapter(tmp_path / "other"))


def test_adapter_for_more_layers_is_refused(llama_case, tmp_path):
    base_dir, _, _, _ = llama_case
    make_adapter(tiny_llama(layers=3), LLAMA_TARGETS, tmp_path / "deeper")
    _, tensors = load_checkpoint(base_dir)
    with pytest.raises(UserError, match="targets layer 2 but the model has 2 layers"):
        merge_lora(tensors, load_adapter(tmp_path / "deeper"))


def test_adapter_for_a_missing_module_is_refused(llama_case, tmp_path):
    base_dir, adapter_dir, _, _ = llama_case
    _, tensors = load_checkpoint(base_dir)
    renamed = tmp_path / "renamed"
    shutil.copytree(adapter_dir, renamed)
    weights, _ = read_safetensors(adapter_dir / "adapter_model.safetensors")
    write_safetensors(renamed / "adapter_model.safetensors",
                      {k.replace("mlp.up_proj", "mlp.w3"): np.array(v) for k, v in weights.items()})
    with pytest.raises(UserError, match=r"targets mlp\.w3, which the model's layers lack \(they have .*up_proj"):
        apply_lora(tensors, load_adapter(renamed))
    opt_adapter = tmp_path / "opt"
    make_adapter(tiny_opt(), OPT_TARGETS, opt_adapter)
    with pytest.raises(UserError, match="model has no model.decoder.layers"):
        apply_lora(tensors, load_adapter(opt_adapter))


@pytest.mark.parametrize("change,message", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias='all'"),
    ({"peft_type": "IA3"}, "only LORA"),
    ({"init_lora_weights": "pissa"}, "changes the base weights"),
    ({"r": 0}, "r must be a positive number"),
])
def test_unsupported_settings_are_refused(llama_case, tmp_path, change, message):
    _, adapter_dir, _, _ = llama_case
    edited = tmp_path / "edited"
    shutil.copytree(adapter_dir, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=message):
        load_adapter(edited)


def test_broken_adapter_directories_are_refused(llama_case, tmp_path):
    _, adapter_dir, _, _ = llama_case
    with pytest.raises(UserError, match="does not exist"):
        load_adapter(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(adapter_dir, broken)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="has no adapter_model.safetensors"):
        load_adapter(broken)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        load_adapter(broken)
    (broken / "adapter_config.json").unlink()
    with pytest.raises(UserError, match="has no adapter_config.json"):
        load_adapter(broken)


@pytest.fixture(scope="module")
def tokenized_case(tmp_path_factory):
    """A tiny Llama with the real Llama 2 tokenizer, its NF4 build, and a LoRA adapter for it."""
    from pipeline.quantize_model import build_quantized
    from pipeline.tags import parse_tag

    path = tmp_path_factory.mktemp("cli")
    hf_model = save_tiny_llama(path / "base", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=32)
    make_adapter(hf_model, LLAMA_TARGETS, path / "adapter")
    build_quantized(path / "base", parse_tag("nf4"), path / "base.nf4", progress=False)
    return path


def test_api_loads_with_adapter(tokenized_case):
    llm = load(str(tokenized_case / "base.nf4"), lora=str(tokenized_case / "adapter"))
    assert isinstance(llm.model.layers[0]["mlp.down_proj.weight"], LoraWeight)
    assert np.isfinite(llm.score("Hello world, how are you?").total)


@pytest.mark.parametrize("model", ["base", "base.nf4"])
def test_cli_runs_with_adapter(tokenized_case, model):
    result = subprocess.run([sys.executable, "run.py", "--model", str(tokenized_case / model), "--lora",
                             str(tokenized_case / "adapter"), "--max-new-tokens", "4", "--seed", "1", "Hello"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_cli_bad_adapter_gets_one_line(tokenized_case, tmp_path):
    result = subprocess.run([sys.executable, "run.py", "--model", str(tokenized_case / "base"), "--lora",
                             str(tmp_path / "missing"), "Hello"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: LoRA adapter directory") and len(result.stderr.splitlines()) == 1


def test_adapter_merged_before_quantization(tokenized_case, tmp_path):
    """quantize.py --lora: the merged-then-quantized model tracks float+adapter, not the bare base."""
    out = tmp_path / "merged.rtn8"
    result = subprocess.run([sys.executable, "quantize.py", "--model", str(tokenized_case / "base"), "--method",
                             "rtn", "--bits", "8", "--lora", str(tokenized_case / "adapter"), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ids = load(str(tokenized_case / "base")).tokenizer.encode("Hello world, how are you?")
    logits = {name: token_logprobs(load(*args).model, ids) for name, args in {
        "merged": (str(out),), "adapted": (str(tokenized_case / "base"), "cpu", str(tokenized_case / "adapter")),
        "bare": (str(tokenized_case / "base"),)}.items()}
    assert np.abs(logits["merged"] - logits["adapted"]).max() < 0.1 * np.abs(logits["bare"] - logits["adapted"]).max()


def test_merging_needs_an_output_name(tokenized_case):
    result = subprocess.run([sys.executable, "quantize.py", "--model", str(tokenized_case / "base"), "--lora",
                             str(tokenized_case / "adapter")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "--out" in result.stderr and "Traceback" not in result.stderr


def test_adapter_with_nan_is_refused_naming_the_module(llama_case, tmp_path):
    _, adapter_dir, _, _ = llama_case
    poisoned = tmp_path / "poisoned"
    shutil.copytree(adapter_dir, poisoned)
    weights, _ = read_safetensors(poisoned / "adapter_model.safetensors")
    weights = {k: np.array(v) for k, v in weights.items()}
    weights["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"][0, 0] = np.nan
    write_safetensors(poisoned / "adapter_model.safetensors", weights)
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.up_proj's lora_A or lora_B holds NaN"):
        load_adapter(poisoned)


def test_pickle_payload_in_adapter_bin_is_refused_naming_the_file(llama_case, tmp_path):
    """An adapter_model.bin whose pickle would run code: refused, and the message names that file."""
    import pickle
    import zipfile

    class Reduce:
        def __init__(self, *call):
            self.call = call

        def __reduce__(self):
            return self.call

    _, adapter_dir, _, _ = llama_case
    hostile = tmp_path / "hostile"
    shutil.copytree(adapter_dir, hostile)
    (hostile / "adapter_model.safetensors").unlink()
    marker = tmp_path / "ran"
    with zipfile.ZipFile(hostile / "adapter_model.bin", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": Reduce(os.system, (f"touch {marker}",))}, protocol=2))
    with pytest.raises(UserError) as caught:
        load_adapter(hostile)
    message = str(caught.value)
    assert f"from {hostile / 'adapter_model.bin'}" in message and "pytorch_model.bin" not in message
    assert "re-save it as safetensors" in message and "\n" not in message
    assert not marker.exists()
