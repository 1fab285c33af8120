"""Tests for runtime.checkpoints.llama2c on the real stories260K checkpoint, with transformers' RoPE as the oracle."""
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from runtime.errors import UserError
from runtime.checkpoints.llama2c import load_llama2c

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "models" / "stories260K" / "stories260K.bin"
needs_stories = pytest.mark.skipif(not STORIES.is_file(), reason=f"{STORIES} is not available")


@needs_stories
def test_stories260k_shapes_and_exact_size():
    config, tensors = load_llama2c(STORIES)
    # the data README: dim 64, hidden 172, 5 layers, 8 heads, 4 kv heads, vocab 512, seq_len 512
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 172, 5)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (8, 4)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (512, 512)
    assert config["tie_word_embeddings"] and "lm_head.weight" not in tensors
    shapes = {"input_layernorm": (64,), "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64),
              "self_attn.v_proj": (32, 64), "self_attn.o_proj": (64, 64), "post_attention_layernorm": (64,),
              "mlp.gate_proj": (172, 64), "mlp.down_proj": (64, 172), "mlp.up_proj": (172, 64)}
    expected = {"model.embed_tokens.weight": (512, 64), "model.norm.weight": (64,)}
    expected |= {f"model.layers.{i}.{name}.weight": shape for i in range(5) for name, shape in shapes.items()}
    assert {name: t.shape for name, t in tensors.items()} == expected
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert isinstance(tensors["model.layers.2.mlp.down_proj.weight"], np.memmap)
    # every byte is accounted for: header, the tensors, and the two RoPE tables [seq_len, head_size / 2]
    rope_tables = 2 * 512 * 4
    assert 4 * (7 + sum(t.size for t in tensors.values()) + rope_tables) == STORIES.stat().st_size


@needs_stories
def test_stories260k_rope_tables_sit_where_the_layout_says():
    """The file's last floats are llama2.c's freq_cis tables (model.py precompute_freqs_cis, theta 1e4)."""
    tail = np.fromfile(STORIES, dtype="<f4")[-2 * 512 * 4:].reshape(2, 512, 4)  # [cos/sin, pos, head_size/2]
    angles = np.arange(512)[:, None] * 10000.0 ** (-np.arange(0, 8, 2) / 8)  # [pos, head_size/2]
    # llama2.c computes the angles in float32: |error| <= pos * freq * 2**-24, about 3e-6 at pos 511
    np.testing.assert_allclose(tail[0], np.cos(angles), atol=1e-5)
    np.testing.assert_allclose(tail[1], np.sin(angles), atol=1e-5)


def llama2c_rope(x: np.ndarray, head_size: int) -> np.ndarray:
    """run.c's RoPE: rotate adjacent pairs (x[i], x[i+1]) of every head by pos * 10000^(-(i % hs) / hs)."""
    out = x.astype(np.float64)  # [T, n_heads * head_size]
    pos = np.arange(x.shape[0])[:, None]  # [T, 1]
    freq = 10000.0 ** (-(np.arange(0, x.shape[1], 2) % head_size) / head_size)  # [n_heads * head_size / 2]
    cos, sin = np.cos(pos * freq), np.sin(pos * freq)  # [T, n_heads * head_size / 2]
    even, odd = x[:, 0::2], x[:, 1::2]
    out[:, 0::2], out[:, 1::2] = even * cos - odd * sin, even * sin + odd * cos
    return out


@needs_stories
def test_stories260k_qk_reordered_for_hf_rope():
    """Attention scores with llama2.c's weights and RoPE equal those with ours and transformers' RoPE."""
    config, tensors = load_llama2c(STORIES)
    dim, heads, kv_heads, hs = 64, 8, 4, 8
    raw = np.fromfile(STORIES, dtype="<f4", offset=28)
    wq_start = 512 * dim + 5 * dim  # after the embedding and rms_att_weight
    wk_start = wq_start + 5 * dim * dim
    layer = 3
    wq = raw[wq_start + layer * dim * dim:][:dim * dim].reshape(dim, dim)  # [dim, dim], llama2.c order
    wk = raw[wk_start + layer * 32 * dim:][:32 * dim].reshape(32, dim)  # [kv_dim, dim]
    x = np.random.default_rng(0).standard_normal((7, dim)).astype(np.float32)  # [T, dim]

    q_ref = llama2c_rope(x @ wq.T, hs).reshape(7, heads, hs)  # [T, heads, hs]
    k_ref = llama2c_rope(x @ wk.T, hs).reshape(7, kv_heads, hs)
    scores_ref = np.einsum("thd,shd->hts", q_ref, np.repeat(k_ref, heads // kv_heads, axis=1))

    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    q = torch.from_numpy(x @ tensors[f"model.layers.{layer}.self_attn.q_proj.weight"].T).reshape(1, 7, heads, hs)
    k = torch.from_numpy(x @ tensors[f"model.layers.{layer}.self_attn.k_proj.weight"].T).reshape(1, 7, kv_heads, hs)
    cos, sin = LlamaRotaryEmbedding(hf_config)(q, torch.arange(7)[None])
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [1, heads, T, hs]
    scores = torch.einsum("htd,hsd->hts", q[0], k[0].repeat_interleave(heads // kv_heads, dim=0)).numpy()
    np.testing.assert_allclose(scores, scores_ref, rtol=1e-4, atol=1e-4)


def test_untied_classifier_is_read_last(tmp_path):
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = 8, 12, 1, 2, 1, 10, 4
    n_floats = (vocab * dim + layers * (2 * dim + 2 * dim * dim + 2 * 4 * dim + 3 * hidden * dim)
                + dim + seq_len * (dim // heads) + vocab * dim)
    values = np.arange(n_floats, dtype="<f4")
    path = tmp_path / "untied.bin"
    path.write_bytes(np.array([dim, hidden, layers, heads, kv_heads, -vocab, seq_len], "<i4").tobytes()
                     + values.tobytes())
    config, tensors = load_llama2c(path)
    assert not config["tie_word_embeddings"] and config["vocab_size"] == vocab
    assert np.array_equal(tensors["model.embed_tokens.weight"].ravel(), values[:vocab * dim])
    assert np.array_equal(tensors["lm_head.weight"].ravel(), values[-vocab * dim:])


@needs_stories
@pytest.mark.parametrize("damage", ["truncated", "extra", "magic"])
def test_damaged_files_raise_user_error(tmp_path, damage):
    raw = STORIES.read_bytes()
    path = tmp_path / "model.bin"
    if damage == "truncated":
        path.write_bytes(raw[:-4])
    elif damage == "extra":
        path.write_bytes(raw + bytes(4))
    else:
        path.write_bytes(b"24ka" + raw[4:])  # uint32 0x616b3432 little-endian: a versioned export
    with pytest.raises(UserError, match="truncated or corrupt|versioned llama2.c"):
        load_llama2c(path)
