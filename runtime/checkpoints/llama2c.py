"""Load a karpathy/llama2.c `.bin` checkpoint (the legacy "version 0" format) as HF-named tensors.

Follows llama2.c's export.py (`legacy_export`) and run.c (`memory_map_weights`):

    header   7 x int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads,
             vocab_size (negative: the classifier is not tied to the embedding),
             seq_len
    float32, little-endian, in this order (L = n_layers, kv_dim = dim * n_kv_heads / n_heads):
      token_embedding_table [vocab, dim]
      rms_att_weight        [L, dim]
      wq [L, dim, dim]   wk [L, kv_dim, dim]   wv [L, kv_dim, dim]   wo [L, dim, dim]
      rms_ffn_weight        [L, dim]
      w1 [L, hidden, dim]   w2 [L, dim, hidden]   w3 [L, hidden, dim]
      rms_final_weight      [dim]
      freq_cis_real, freq_cis_imag   [seq_len, head_size / 2] each (unused: RoPE is recomputed)
      wcls                  [vocab, dim]   only when vocab_size < 0

w1/w2/w3 are HF's gate/down/up projections. llama2.c rotates adjacent pairs
in RoPE (Meta's layout), so wq/wk rows are reordered to HF's half-split order
(see runtime.checkpoints.gguf_io); every other tensor is a memory-mapped view of the file.
The model constants not in the header are llama2.c's: RMSNorm eps 1e-5, RoPE
base 10000, and the Llama 2 SentencePiece ids BOS 1, EOS 2.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtime.errors import UserError
from runtime.checkpoints.rope_layout import interleaved_to_half_split
from runtime.checkpoints.safetensors_io import corrupt

HEADER_INTS = 7
# The newer llama2.c formats (export.py version >= 1) start with this magic: "ak42".
VERSIONED_MAGIC = 0x616B3432


def read_header(path: Path) -> tuple[int, int, int, int, int, int, int]:
    """The 7 header integers, checked for sense; UserError when they are not a llama2.c model."""
    with open(path, "rb") as f:
        raw = f.read(4 * HEADER_INTS)
    if len(raw) < 4 * HEADER_INTS:
        raise corrupt(path, f"{len(raw)} bytes, shorter than the 28-byte llama2.c header")
    if int.from_bytes(raw[:4], "little") == VERSIONED_MAGIC:
        raise UserError(f"{path} is a versioned llama2.c export (magic 'ak42'); only the legacy format "
                        "is supported: re-export it with `export.py --version 0`")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = (int(v) for v in np.frombuffer(raw, "<i4"))
    if (min(dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len) <= 0
            or dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2):
        raise UserError(f"{path} is not a llama2.c checkpoint: its header (dim {dim}, hidden {hidden}, "
                        f"layers {n_layers}, heads {n_heads}/{n_kv_heads}, vocab {vocab}, seq_len {seq_len}) "
                        "makes no sense; check the file")
    return dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len


def load_llama2c(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a llama2.c legacy .bin; return (HF-style Llama config, {HF name: float32 array})."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; check the model path or rebuild/re-download it")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = read_header(path)
    tied, vocab = vocab > 0, abs(vocab)
    head_size = dim // n_heads
    kv_dim = head_size * n_kv_heads
    # (name, shape) of every array in file order; None marks the unused RoPE tables.
    layout = [
        ("embed", (vocab, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        (None, (2, seq_len, head_size // 2)),
    ] + ([] if tied else [("wcls", (vocab, dim))])
    n_floats = sum(int(np.prod(shape)) for _, shape in layout)
    expected, size = 4 * (HEADER_INTS + n_floats), path.stat().st_size
    if size != expected:
        raise corrupt(path, f"{size} bytes, but its header describes a {expected}-byte llama2.c model")
    data = np.memmap(path, dtype="<f4", mode="r", offset=4 * HEADER_INTS, shape=(n_floats,))  # [n_floats]
    arrays, offset = {}, 0
    for name, shape in layout:
        count = int(np.prod(shape))
        if name is not None:
            arrays[name] = data[offset:offset + count].reshape(shape)
        offset += count

    tensors = {"model.embed_tokens.weight": arrays["embed"]}  # [vocab, dim]
    for i in range(n_layers):
        layer = f"model.layers.{i}"
        tensors[f"{layer}.input_layernorm.weight"] = arrays["rms_att"][i]  # [dim]
        wq, wk = arrays["wq"][i], arrays["wk"][i]  # [dim, dim], [kv_dim, dim] in interleaved RoPE order
        tensors[f"{layer}.self_attn.q_proj.weight"] = interleaved_to_half_split(wq, n_heads)  # [dim, dim]
        tensors[f"{layer}.self_attn.k_proj.weight"] = interleaved_to_half_split(wk, n_kv_heads)  # [kv_dim, dim]
        tensors[f"{layer}.self_attn.v_proj.weight"] = arrays["wv"][i]  # [kv_dim, dim]
        tensors[f"{layer}.self_attn.o_proj.weight"] = arrays["wo"][i]  # [dim, dim]
        tensors[f"{layer}.post_attention_layernorm.weight"] = arrays["rms_ffn"][i]  # [dim]
        tensors[f"{layer}.mlp.gate_proj.weight"] = arrays["w1"][i]  # [hidden, dim]
        tensors[f"{layer}.mlp.down_proj.weight"] = arrays["w2"][i]  # [dim, hidden]
        tensors[f"{layer}.mlp.up_proj.weight"] = arrays["w3"][i]  # [hidden, dim]
    tensors["model.norm.weight"] = arrays["rms_final"]  # [dim]
    if not tied:
        tensors["lm_head.weight"] = arrays["wcls"]  # [vocab, dim]

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": seq_len,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    return config, tensors
