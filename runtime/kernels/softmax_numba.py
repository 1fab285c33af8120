"""Numba kernels of the softmax-shaped work of a training pass (pipeline/training/backward.py), in place.

A window's attention scores [B, KV, G, T, T] and the LM head's logits [rows, vocab] are the largest arrays
of a training pass. NumPy makes four to six passes over each (scale, causal mask, max, exp, sum, divide);
these make two or three per row. They run on the calling thread: training runs BLAS on every core
(`runtime.blas_on_every_core`), and BLAS's threads spin after each product, so a parallel region here
waited for them (measured: the SmolLM2 training step 10% slower than NumPy's passes, 17% faster serial).

Each:

- `causal_softmax_(scores, scale)`: row t of the T x T scores of each head (query t sees keys 0..t) becomes
  softmax(scale · s) over keys 0..t and 0 for the future keys, the -inf entries of the masked reference.
- `causal_softmax_backward_(p, dp, scale)`: row t of dp becomes scale · p ⊙ (dp - Σ_j dp_j p_j) over keys
  0..t, the gradient of the scores of p = softmax(scale · s) (Bridle 1990's softmax Jacobian applied to dp),
  and 0 for the future keys, whatever dp held there (the attention computes only the blocks of dp that reach
  the diagonal).
- `cross_entropy_(logits, targets)`: per row z, the loss log Σ_j e^{z_j} - z_target (float64, returned) and,
  written over z, its gradient softmax(z) - onehot(target).

The maximum is subtracted before every exponential, which goes through `exp32`
(runtime/kernels/numba_common.py, relative error 3e-7).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from runtime.kernels.numba_common import exp32


@njit(cache=True, fastmath=True)
def _causal_softmax_rows(scores, scale):
    """`causal_softmax_` of scores [heads, T, T] (C-contiguous), rows one after another."""
    n, T, _ = scores.shape
    for row in range(n * T):
        s = scores[row // T, row % T]  # [T]
        seen = row % T + 1
        top = np.float32(-np.inf)
        for j in range(seen):
            s[j] *= scale
            top = max(top, s[j])
        total = np.float32(0.0)
        for j in range(seen):
            s[j] = exp32(s[j] - top)
            total += s[j]
        inverse = np.float32(1.0) / total
        for j in range(seen):
            s[j] *= inverse
        s[seen:] = 0.0


def causal_softmax_(scores: np.ndarray, scale: float) -> np.ndarray:
    """scores [..., T, T] float32 C-contiguous, overwritten with the causal softmax of scale · scores
    (module docstring) and returned."""
    T = scores.shape[-1]
    _causal_softmax_rows(scores.reshape(-1, T, T), np.float32(scale))
    return scores


@njit(cache=True, fastmath=True)
def _causal_softmax_backward_rows(p, dp, scale):
    """`causal_softmax_backward_` of p, dp [heads, T, T] (C-contiguous), rows one after another."""
    n, T, _ = p.shape
    for row in range(n * T):
        pr, dr = p[row // T, row % T], dp[row // T, row % T]  # [T] each
        seen = row % T + 1
        dot = np.float32(0.0)
        for j in range(seen):
            dot += dr[j] * pr[j]
        for j in range(seen):
            dr[j] = scale * pr[j] * (dr[j] - dot)
        dr[seen:] = 0.0


def causal_softmax_backward_(p: np.ndarray, dp: np.ndarray, scale: float) -> np.ndarray:
    """dp [..., T, T] float32 C-contiguous, overwritten with the gradient of the scores s of the causal
    p = softmax(scale · s) [..., T, T] (module docstring; dp's future entries are not read) and returned."""
    T = p.shape[-1]
    _causal_softmax_backward_rows(p.reshape(-1, T, T), dp.reshape(-1, T, T), np.float32(scale))
    return dp


@njit(cache=True, fastmath=True)
def _cross_entropy_rows(logits, targets, losses):
    """`cross_entropy_` of logits [rows, vocab] (C-contiguous) into losses [rows], rows one after another."""
    for row in range(logits.shape[0]):
        z = logits[row]  # [vocab]
        picked = z[targets[row]]
        top = np.float32(-np.inf)
        for j in range(z.shape[0]):
            top = max(top, z[j])
        total = np.float32(0.0)
        for j in range(z.shape[0]):
            z[j] = exp32(z[j] - top)
            total += z[j]
        inverse = np.float32(1.0) / total
        for j in range(z.shape[0]):
            z[j] *= inverse
        z[targets[row]] -= np.float32(1.0)
        losses[row] = math.log(np.float64(total)) + np.float64(top) - np.float64(picked)


def cross_entropy_(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Losses [rows] float64 of logits [rows, vocab] float32 C-contiguous against targets [rows] (each in
    0..vocab-1); logits are overwritten with dL/dlogits = softmax - onehot."""
    losses = np.empty(logits.shape[0], dtype=np.float64)  # [rows]
    _cross_entropy_rows(logits, np.ascontiguousarray(targets, dtype=np.int64), losses)
    return losses
