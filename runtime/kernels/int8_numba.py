"""Numba CPU kernels of the int8 format (layout and definition: runtime/formats/int8.py).

Each kernel equals its NumPy counterpart in the format module bit for bit:

- `quantize_tokens`: activations x [m, in] -> int8 xq and scales sx, per
  token or per tensor, outlier columns zeroed (`quantize_activations`).
- `int_matmul_decode` / `int_matmul_prefill`: acc[r, o] = sum_i xq[r, i] *
  qweight[o, i] accumulated in int32 (exact), parallel over output rows
  (`prange`). Decode (a few input rows) makes one pass over each weight row
  per input row; prefill (many rows) works on blocks of `ROW_BLOCK` weight
  rows times `TOKEN_BLOCK` input rows, so each block of W is read from
  memory once per block of tokens and stays in cache.
- `apply_scales`: y[r, o] = float32(acc[r, o]) * sx[r] * sw[o].

The integer dot products are kept apart from the float scaling: with both
in one loop LLVM stops vectorizing the int8 dot product (measured 3x slower).
The outlier columns' float product is added by NumPy in the format module.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

QMAX = np.float32(127.0)
ROW_BLOCK = 16  # weight rows per prefill block
TOKEN_BLOCK = 32  # input rows per prefill block


@njit(cache=True, inline="always")
def _dot(a, b):
    """sum_i a[i] * b[i] of two int8 vectors, accumulated in int32."""
    acc = np.int32(0)
    for i in range(a.shape[0]):
        acc += np.int32(a[i]) * np.int32(b[i])
    return acc


@njit(cache=True)
def _quantize(x, outliers, per_tensor, xq, sx):
    """xq [m, in] = rint(x / sx) with outlier columns 0; sx [m] = absmax / 127 (1 when absmax is 0)."""
    m, n = x.shape
    for r in range(m):
        absmax = np.float32(0.0)
        for i in range(n):
            if not outliers[i]:
                absmax = max(absmax, abs(x[r, i]))
        sx[r] = absmax
    if per_tensor:
        top = np.float32(0.0)
        for r in range(m):
            top = max(top, sx[r])
        sx[:] = top
    for r in range(m):
        s = sx[r] / QMAX if sx[r] > 0 else np.float32(1.0)
        sx[r] = s
        for i in range(n):
            xq[r, i] = 0 if outliers[i] else np.int8(np.rint(x[r, i] / s))


@njit(cache=True, parallel=True)
def _decode(qweight, xq, acc):
    """acc[r, o] for every row r of xq, parallel over output rows o."""
    for o in prange(qweight.shape[0]):
        row = qweight[o]  # [in]
        for r in range(xq.shape[0]):
            acc[r, o] = _dot(xq[r], row)


@njit(cache=True, parallel=True)
def _prefill(qweight, xq, acc):
    """acc [m, out] by blocks of ROW_BLOCK output rows x TOKEN_BLOCK input rows, parallel over row blocks."""
    n_out = qweight.shape[0]
    m = xq.shape[0]
    for block in prange((n_out + ROW_BLOCK - 1) // ROW_BLOCK):
        o0 = block * ROW_BLOCK
        o1 = min(o0 + ROW_BLOCK, n_out)
        for r0 in range(0, m, TOKEN_BLOCK):
            r1 = min(r0 + TOKEN_BLOCK, m)
            for o in range(o0, o1):
                row = qweight[o]  # [in]
                for r in range(r0, r1):
                    acc[r, o] = _dot(xq[r], row)


@njit(cache=True)
def _scale(acc, sx, sw, y):
    """y[r, o] = float32(acc[r, o]) * sx[r] * sw[o]."""
    for r in range(acc.shape[0]):
        for o in range(acc.shape[1]):
            y[r, o] = np.float32(acc[r, o]) * sx[r] * sw[o]


def quantize_tokens(x: np.ndarray, outliers: np.ndarray, per_tensor: bool) -> tuple[np.ndarray, np.ndarray]:
    """(xq [m, in] int8, sx [m] float32) of x [m, in] float32 (C-contiguous); outliers: bool [in]."""
    xq = np.empty(x.shape, dtype=np.int8)  # [m, in]
    sx = np.empty(x.shape[0], dtype=np.float32)  # [m]
    _quantize(x, outliers, per_tensor, xq, sx)
    return xq, sx


def int_matmul_decode(qweight: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """acc [m, out] int32 = xq [m, in] @ qweight [out, in].T (decode path)."""
    acc = np.empty((xq.shape[0], qweight.shape[0]), dtype=np.int32)  # [m, out]
    _decode(qweight, xq, acc)
    return acc


def int_matmul_prefill(qweight: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """acc [m, out] int32, as `int_matmul_decode`, blocked for many input rows (prefill path)."""
    acc = np.empty((xq.shape[0], qweight.shape[0]), dtype=np.int32)  # [m, out]
    _prefill(qweight, xq, acc)
    return acc


def apply_scales(acc: np.ndarray, sx: np.ndarray, sw: np.ndarray) -> np.ndarray:
    """y [m, out] float32 = float32(acc) * sx[:, None] * sw[None, :]."""
    y = np.empty(acc.shape, dtype=np.float32)  # [m, out]
    _scale(acc, sx, sw, y)
    return y
