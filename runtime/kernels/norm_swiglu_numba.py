"""Numba kernels of a training pass's RMSNorm and SwiGLU steps and their backward (pipeline/training/backward.py).

NumPy runs each of these as five to eight passes over [tokens, width] arrays, with a temporary per operation;
each kernel here is one or two passes per row. They run on the calling thread, as the softmax kernels
(runtime/kernels/softmax_numba.py, whose docstring says why). Rows are the last axis of C-contiguous float32
arrays; leading axes are flattened.

- RMSNorm (Zhang & Sennrich 2019): n = x · r · w with r = 1 / sqrt(mean(x²) + eps) per row (the mean
  accumulated in float32); backward dx = r·u - x·r³·mean(u·x), u = w·dn.
- SwiGLU (Shazeer 2020): act = silu(gate) · up with silu(g) = g·σ(g), σ(g) = 1 / (1 + e^-g) through `exp32`
  (runtime/kernels/numba_common.py: clamped, so no overflow); backward dgate = dact·up·σ(1 + g(1 - σ)),
  dup = dact·g·σ.

The kernels use NumPy's error model: Numba's default checks every division for a zero divisor, and that
branch kept SwiGLU's loop scalar (2.6 ms for [512, 1536] where it vectorizes to 0.28).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from runtime.kernels.numba_common import exp32


def flat(a: np.ndarray) -> np.ndarray:
    """a's values as a flat C-order float32 array (a view where a already is one)."""
    return np.ascontiguousarray(a, dtype=np.float32).reshape(-1)


@njit(cache=True, fastmath=True, error_model="numpy")
def _rms_norm_rows(x, weight, eps, out, r):
    """out [rows, d] = x · r · weight and r [rows] = 1 / sqrt(mean(x²) + eps), row by row."""
    for i in range(x.shape[0]):
        total = np.float32(0.0)
        for j in range(x.shape[1]):
            total += x[i, j] * x[i, j]
        inverse = np.float32(1.0) / np.sqrt(total / np.float32(x.shape[1]) + eps)
        r[i] = inverse
        for j in range(x.shape[1]):
            out[i, j] = x[i, j] * inverse * weight[j]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(x · r · weight [..., d], r [..., 1]) for x [..., d] float32 (module docstring)."""
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])  # [rows, d]
    out, r = np.empty_like(rows), np.empty(rows.shape[0], dtype=np.float32)  # [rows, d], [rows]
    _rms_norm_rows(rows, np.ascontiguousarray(weight, dtype=np.float32), np.float32(eps), out, r)
    return out.reshape(x.shape), r.reshape(*x.shape[:-1], 1)


@njit(cache=True, fastmath=True, error_model="numpy")
def _rms_norm_backward_rows(x, weight, r, dy, dx):
    """dx [rows, d] = r·u - x·r³·mean(u·x), u = weight·dy, row by row."""
    for i in range(x.shape[0]):
        dot = np.float32(0.0)
        for j in range(x.shape[1]):
            dot += dy[i, j] * weight[j] * x[i, j]
        ri = r[i]
        coef = ri * ri * ri * dot / np.float32(x.shape[1])
        for j in range(x.shape[1]):
            dx[i, j] = ri * dy[i, j] * weight[j] - x[i, j] * coef


def rms_norm_backward(x: np.ndarray, weight: np.ndarray, r: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dL/dx [..., d] of `rms_norm` from its input x, weight, r [..., 1] and dL/dn dy [..., d]."""
    d = x.shape[-1]
    rows = lambda a: np.ascontiguousarray(a, dtype=np.float32).reshape(-1, d)  # [rows, d]
    dx = np.empty((x.size // d, d), dtype=np.float32)  # [rows, d]
    _rms_norm_backward_rows(rows(x), np.ascontiguousarray(weight, dtype=np.float32),
                            np.ascontiguousarray(r, dtype=np.float32).reshape(-1), rows(dy), dx)
    return dx.reshape(x.shape)


@njit(cache=True, fastmath=True, error_model="numpy")
def _swiglu_rows(gate, up, sig, act):
    """sig = σ(gate), act = gate · sig · up, over flat arrays."""
    for j in range(gate.shape[0]):
        s = np.float32(1.0) / (np.float32(1.0) + exp32(-gate[j]))
        sig[j] = s
        act[j] = gate[j] * s * up[j]


def swiglu(gate: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(σ(gate), silu(gate) · up), each [..., ffn] float32, of gate and up [..., ffn]."""
    sig, act = np.empty(gate.shape, np.float32), np.empty(gate.shape, np.float32)  # [..., ffn] each
    _swiglu_rows(flat(gate), flat(up), sig.reshape(-1), act.reshape(-1))
    return sig, act


@njit(cache=True, fastmath=True, error_model="numpy")
def _swiglu_backward_rows(dact, gate, up, sig, dgate, dup):
    """dgate = dact·up·σ(1 + g(1 - σ)), dup = dact·g·σ, over flat arrays."""
    for j in range(gate.shape[0]):
        d = dact[j] * sig[j]
        dup[j] = d * gate[j]
        dgate[j] = d * up[j] * (np.float32(1.0) + gate[j] * (np.float32(1.0) - sig[j]))


def swiglu_backward(dact: np.ndarray, gate: np.ndarray, up: np.ndarray,
                    sig: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dL/dgate, dL/dup) [..., ffn] of `swiglu` from dL/dact and its gate, up, σ(gate) (each [..., ffn])."""
    dgate, dup = np.empty(gate.shape, np.float32), np.empty(gate.shape, np.float32)  # [..., ffn] each
    _swiglu_backward_rows(flat(dact), flat(gate), flat(up), flat(sig), dgate.reshape(-1), dup.reshape(-1))
    return dgate, dup
