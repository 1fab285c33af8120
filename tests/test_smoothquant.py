"""SmoothQuant's offline part (pipeline/smoothing.py) on small random HF Llama and OPT models.

The recorded activation maxima are checked against forward hooks on the HF
transformers model itself; folding the factors into norms and weights must
leave the logits unchanged (1e-5 relative) while actually changing the
weights; post-LN OPT is refused.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model import Config, Model  # noqa: E402
from pipeline import smoothing  # noqa: E402
from runtime.checkpoints.checkpoint import load_checkpoint  # noqa: E402
from runtime.errors import UserError  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=120,
             max_position_embeddings=64, initializer_range=0.2)
CASES = {"llama": ("Llama", dict(intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=False)),
         "opt": ("OPT", dict(ffn_dim=96))}


def build(family: str, extra: dict, tmp_path):
    """A random HF model with non-trivial norms, saved and loaded back as (config, tensors)."""
    torch.manual_seed(0)
    hf_model = getattr(transformers, f"{family}ForCausalLM")(
        getattr(transformers, f"{family}Config")(**SMALL, **extra)).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf_model.save_pretrained(tmp_path)
    hf_config, tensors = load_checkpoint(tmp_path)
    return hf_model, Config.from_hf(hf_config), tensors


def sequences(n=3, length=20):
    rng = np.random.default_rng(1)
    return [rng.integers(0, SMALL["vocab_size"], length) for _ in range(n)]


def logits(config, tensors, ids):
    model = Model(config, tensors)
    return model.prefill(ids, model.new_cache(len(ids)), all_logits=True)  # [T, vocab]


@pytest.mark.parametrize("case", sorted(CASES))
def test_activation_absmax_matches_hf_hooks(case, tmp_path):
    hf_model, config, tensors = build(*CASES[case], tmp_path)
    seqs = sequences()
    recorded = smoothing.activation_absmax(config, tensors, seqs)
    seen = {}

    def hook(name):
        def record(module, inputs):
            m = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0).numpy()
            seen[name] = np.maximum(seen.get(name, 0), m)
        return record

    for name, module in hf_model.named_modules():
        if f"{name}.weight" in recorded:
            module.register_forward_pre_hook(hook(f"{name}.weight"))
    with torch.no_grad():
        for ids in seqs:
            hf_model(torch.tensor(ids)[None])
    assert set(seen) == set(recorded) and len(recorded) == config.n_layers * (5 if case == "llama" else 4)
    for name in recorded:
        assert np.allclose(recorded[name], seen[name], rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_smoothing_leaves_logits_unchanged(case, tmp_path):
    _, config, tensors = build(*CASES[case], tmp_path)
    smoothed = smoothing.smooth_model(config, tensors, sequences(), alpha=0.5)
    prefix = "model.decoder.layers.0." if case == "opt" else "model.layers.0."
    norm = "self_attn_layer_norm" if case == "opt" else "input_layernorm"
    ratio = tensors[f"{prefix}{norm}.weight"] / smoothed[f"{prefix}{norm}.weight"]  # = s
    assert np.abs(ratio - 1).max() > 0.1  # the factors did something
    assert np.allclose(smoothed[f"{prefix}self_attn.k_proj.weight"],
                       tensors[f"{prefix}self_attn.k_proj.weight"] * ratio[None, :], rtol=1e-5)
    assert np.array_equal(smoothed[f"{prefix}self_attn.{'out_proj' if case == 'opt' else 'o_proj'}.weight"],
                          tensors[f"{prefix}self_attn.{'out_proj' if case == 'opt' else 'o_proj'}.weight"])
    ids = np.random.default_rng(2).integers(0, SMALL["vocab_size"], 24)
    before, after = logits(config, tensors, ids), logits(config, smoothed, ids)
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()


def test_post_ln_opt_is_refused(tmp_path):
    _, config, tensors = build("OPT", dict(ffn_dim=96, do_layer_norm_before=False), tmp_path)
    with pytest.raises(UserError):
        smoothing.smooth_model(config, tensors, sequences())


def test_too_long_sequence_is_refused(tmp_path):
    _, config, tensors = build(*CASES["llama"], tmp_path)
    with pytest.raises(UserError):
        smoothing.activation_absmax(config, tensors, [np.zeros(SMALL["max_position_embeddings"] + 1, int)])


class CharTokenizer:
    """One token per character (a stand-in with the Tokenizer.encode signature)."""

    def encode(self, text, add_bos=None):
        return [ord(c) % 100 for c in text]


def test_calibration_sequences(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("abcdefghij" * 10)
    seqs = smoothing.calibration_sequences(CharTokenizer(), n_sequences=3, length=7, path=text)
    assert [len(s) for s in seqs] == [7, 7, 7]
    assert seqs[1].tolist() == [ord(c) % 100 for c in "hijabcd"]
    with pytest.raises(UserError):
        smoothing.calibration_sequences(CharTokenizer(), n_sequences=20, length=7, path=text)
