"""Oracle tests: our forward pass against HF transformers on small random OPT and Llama models.

Each case builds the HF model on CPU with a fixed seed, saves it with
`save_pretrained`, loads it with our loader, and compares logits for prefill
and for token-by-token decode through the KV cache (max abs error < 1e-4).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model import Config, Model  # noqa: E402
from runtime.checkpoints.checkpoint import load_checkpoint  # noqa: E402

TOLERANCE = 1e-4
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=120,
             max_position_embeddings=64, initializer_range=0.2)

CASES = {
    "opt-pre-ln": ("OPT", dict(ffn_dim=96)),
    "opt-post-ln": ("OPT", dict(ffn_dim=96, do_layer_norm_before=False)),
    "opt-project-in-out": ("OPT", dict(ffn_dim=96, do_layer_norm_before=False, word_embed_proj_dim=32)),
    "llama-gqa-tied": ("Llama", dict(intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True,
                                     rope_theta=100000.0)),
    "llama-untied": ("Llama", dict(intermediate_size=96, num_key_value_heads=4, tie_word_embeddings=False)),
    "llama-attention-bias": ("Llama", dict(intermediate_size=96, num_key_value_heads=1, attention_bias=True,
                                           tie_word_embeddings=False)),
}


def build_hf(family: str, extra: dict):
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**SMALL, **extra)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    if family == "Llama":  # make norms non-trivial so a missing weight would show
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
    return model


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)[None]).logits[0].float().numpy()  # [T, vocab]


def compare(hf_model, path):
    config, tensors = load_checkpoint(path)
    ours = Model(Config.from_hf(config), tensors)
    ids = np.random.default_rng(1).integers(0, SMALL["vocab_size"], 20)
    ref = hf_logits(hf_model, ids)  # [20, vocab]
    assert np.abs(ref).max() > 0.5, "logits too small for the comparison to mean anything"
    cache = ours.new_cache(32)
    prefill = ours.prefill(ids[:12], cache, all_logits=True)  # [12, vocab]
    assert prefill.dtype == np.float32  # nothing silently promoted to float64
    assert np.abs(prefill - ref[:12]).max() < TOLERANCE
    for j, token in enumerate(ids[12:]):
        assert np.abs(ours.decode(int(token), cache) - ref[12 + j]).max() < TOLERANCE
    assert cache.length == len(ids)


@pytest.mark.parametrize("case", sorted(CASES))
def test_safetensors_checkpoint_matches_transformers(case, tmp_path):
    hf_model = build_hf(*CASES[case])
    hf_model.save_pretrained(tmp_path)
    compare(hf_model, tmp_path)


def test_pytorch_bin_checkpoint_matches_transformers(tmp_path):
    hf_model = build_hf(*CASES["opt-pre-ln"])
    hf_model.config.save_pretrained(tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    compare(hf_model, tmp_path)


def test_prefill_after_cached_tokens_matches_one_prefill():
    hf_model = build_hf(*CASES["llama-gqa-tied"])
    tensors = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    ours = Model(Config.from_hf(hf_model.config.to_dict()), tensors)
    ids = np.arange(3, 19)
    whole = ours.prefill(ids, ours.new_cache(), all_logits=True)  # [16, vocab]
    cache = ours.new_cache()
    ours.prefill(ids[:9], cache)
    assert np.abs(ours.prefill(ids[9:], cache, all_logits=True) - whole[9:]).max() < TOLERANCE


def test_unsupported_architecture_is_a_user_error():
    from runtime.errors import UserError
    with pytest.raises(UserError, match="unsupported architecture"):
        Config.from_hf({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"})
