"""The two row orders of Q and K weights for rotary position embeddings (RoPE, Su et al. 2021).

Meta's original Llama, llama2.c and llama.cpp's GGUF files rotate adjacent
pairs (x0, x1), (x2, x3), ... of each head; Hugging Face checkpoints rotate
halves (x0, x_{d/2}), (x1, x_{d/2+1}), ... llama.cpp's converter
(convert_hf_to_gguf.py, LlamaModel.permute) reorders the rows of attn_q and
attn_k so that, within each head, interleaved row 2j is half-split row j and
row 2j+1 is row j + head_dim/2. NumPy only, so that readers of llama2.c
files need not import the gguf package.
"""
from __future__ import annotations

import numpy as np


def interleaved_to_half_split(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q or K rows (weight [out, in] or bias [out]) from interleaved-pair to HF half-split RoPE order."""
    head_dim = w.shape[0] // n_head
    per_head = w.reshape(n_head, head_dim // 2, 2, *w.shape[1:])  # [n_head, head_dim/2, 2, (in)]
    return per_head.swapaxes(1, 2).reshape(w.shape)  # [out, (in)]


def half_split_to_interleaved(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse: HF half-split rows -> interleaved pairs, as llama.cpp's converter writes them."""
    head_dim = w.shape[0] // n_head
    per_head = w.reshape(n_head, 2, head_dim // 2, *w.shape[1:])  # [n_head, 2, head_dim/2, (in)]
    return per_head.swapaxes(1, 2).reshape(w.shape)  # [out, (in)]
