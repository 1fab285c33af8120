"""Numba kernels of the elementwise work of one Llama or OPT decode step (one token), each one call.

The forward pass of model.py does these with several NumPy calls each; for a
single token the calls, not the arithmetic, are the cost (llama2.c's `forward`
does them as plain loops). Same operations as the NumPy path, in float32:

- `rms_norm`: x / sqrt(mean(x^2) + eps) * w (Zhang & Sennrich 2019), the mean
  accumulated in float32.
- `layer_norm`: (x - mean) / sqrt(var + eps) * w + b (Ba et al. 2016; OPT),
  mean and variance accumulated in float32.
- `rope`: the rotary embedding (Su et al. 2021) in the half-split layout of HF
  checkpoints: for each head, (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin),
  x1 the first half of the head, x2 the second.
- `attend`: writes the step's key and value into the KV cache and runs
  softmax(q k^T / sqrt(hd)) v of every query head over the cached positions,
  grouped-query heads sharing a kv head (Ainslie et al. 2023): the query heads
  of a kv head read its cached rows together, the kv heads split over the
  threads (TinyLlama-1.1B's 32 heads over 150 positions: 46 -> 24 us).
- `silu_mul`: SwiGLU's silu(gate) * up (Shazeer 2020), silu as g / (1 + e^-g).

The exponentials of silu and softmax go through `exp32` (runtime/kernels/numba_common.py),
which LLVM vectorizes; silu's division too, under NumPy's error model (Numba's
default checks each division for a zero divisor, a branch that kept the loop
scalar: 3.4 ns an element, 0.35 with it).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from runtime.kernels.numba_common import exp32


@njit(cache=True, fastmath=True)
def rms_norm(x, weight, eps):
    """[d] x / sqrt(mean(x^2) + eps) * weight, for x [d] float32."""
    total = np.float32(0.0)
    for j in range(x.shape[0]):
        total += x[j] * x[j]
    inverse = np.float32(1.0) / np.sqrt(total / np.float32(x.shape[0]) + np.float32(eps))
    out = np.empty_like(x)  # [d]
    for j in range(x.shape[0]):
        out[j] = x[j] * inverse * weight[j]
    return out


@njit(cache=True, fastmath=True)
def layer_norm(x, weight, bias, eps):
    """[d] (x - mean) / sqrt(var + eps) * weight + bias, for x [d] float32."""
    n = np.float32(x.shape[0])
    mean = np.float32(0.0)
    for j in range(x.shape[0]):
        mean += x[j]
    mean /= n
    var = np.float32(0.0)
    for j in range(x.shape[0]):
        var += (x[j] - mean) * (x[j] - mean)
    inverse = np.float32(1.0) / np.sqrt(var / n + np.float32(eps))
    out = np.empty_like(x)  # [d]
    for j in range(x.shape[0]):
        out[j] = (x[j] - mean) * inverse * weight[j] + bias[j]
    return out


@njit(cache=True)
def rope(x, head_dim, cos, sin):
    """Rotate x [heads*hd] in place, head by head (half-split layout); cos, sin [hd/2] of the position."""
    half = head_dim // 2
    for h in range(x.shape[0] // head_dim):
        base = h * head_dim
        for j in range(half):
            x1 = x[base + j]
            x2 = x[base + half + j]
            x[base + j] = x1 * cos[j] - x2 * sin[j]
            x[base + half + j] = x2 * cos[j] + x1 * sin[j]


@njit(cache=True, fastmath=True, error_model="numpy", parallel=True)
def attend(q, k, v, keys, values, position):
    """o [H*hd]: store k, v [KV*hd] at `position` of keys, values [KV, max_len, hd], then attention of
    the H query heads in q [H*hd] over positions 0 .. position (query head h reads kv head h // (H/KV)).
    The query heads of a kv head go together (each cached key and value row read once for all of them), the kv
    heads in parallel."""
    n_kv, _, hd = keys.shape
    n_heads = q.shape[0] // hd
    group = n_heads // n_kv
    for g in range(n_kv):
        keys[g, position] = k[g * hd:(g + 1) * hd]
        values[g, position] = v[g * hd:(g + 1) * hd]
    scale = np.float32(1.0 / np.sqrt(hd))
    out = np.empty(n_heads * hd, dtype=np.float32)  # [H*hd]
    for g in prange(n_kv):
        scores = np.empty((group, position + 1), dtype=np.float32)  # [group, S]
        qg = q[g * group * hd:(g + 1) * group * hd]  # [group*hd] the group's query heads
        for s in range(position + 1):
            key = keys[g, s]  # [hd]
            for r in range(group):
                dot = np.float32(0.0)
                for j in range(hd):
                    dot += qg[r * hd + j] * key[j]
                scores[r, s] = dot * scale
        for r in range(group):
            top = np.float32(-np.inf)
            for s in range(position + 1):
                top = max(top, scores[r, s])
            total = np.float32(0.0)
            for s in range(position + 1):
                scores[r, s] = exp32(scores[r, s] - top)
                total += scores[r, s]
            inverse = np.float32(1.0) / total
            for s in range(position + 1):
                scores[r, s] *= inverse
        og = out[g * group * hd:(g + 1) * group * hd]  # [group*hd]
        og[:] = 0
        for s in range(position + 1):
            value = values[g, s]  # [hd]
            for r in range(group):
                p = scores[r, s]
                for j in range(hd):
                    og[r * hd + j] += p * value[j]
    return out


@njit(cache=True, fastmath=True, error_model="numpy")
def silu_mul(gate, up):
    """[ffn] silu(gate) * up, for gate, up [ffn] float32."""
    out = np.empty_like(gate)  # [ffn]
    for j in range(gate.shape[0]):
        g = gate[j]
        out[j] = g / (np.float32(1.0) + exp32(-g)) * up[j]
    return out
