"""Uniform quantization grids: a scale and an integer zero point for each row of a block of weights.

The grid of the `uniform` format (runtime/formats/uniform.py): b-bit codes
q in [0, maxq], maxq = 2**b - 1, decoding to (q - zero) * scale. Shared by
the methods that produce that format (rtn.py, gptq.py).

The range rule follows the reference quantizer of GPTQ (Frantar et al. 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", code of §5's RTN baseline): the range [lo, hi] of a row is
widened to contain 0, so the zero point is an integer in [0, maxq];

    asymmetric:  scale = (hi - lo) / maxq,            zero = round(-lo / scale)
    symmetric:   scale = 2 max(|lo|, |hi|) / maxq,    zero = 2**(b-1)

The scale is stored as float16, so it is rounded UP to the next float16
value here; with the rounded scale every weight in [lo, hi] is within
scale / 2 of a grid point. The optional MSE clipping (`mse_clip`) is the
same reference's grid search (Nagel et al. 2021, "A White Paper on Neural
Network Quantization", §3.4 range setting by minimising the error): shrink
the range to p * [lo, hi] for p = 1, 0.99, ..., 0.21 (`grid` 100 steps,
`max_shrink` 0.8) and keep, per row, the p with the smallest sum |w - w_q|**2.4
(`norm`). p = 1 (no clipping) is a candidate and only a strictly smaller
error replaces it, so clipping never increases that error.
"""
from __future__ import annotations

import numpy as np

from runtime.errors import UserError

FP16_MAX = 65504.0
GRID = 100
MAX_SHRINK = 0.8
NORM = 2.4


def fp16_ceil(scale: np.ndarray) -> np.ndarray:
    """The smallest float16 values >= scale (> 0), returned as float32; UserError past the float16 range."""
    if (scale > FP16_MAX).any():
        raise UserError(f"weights span more than {FP16_MAX:g} per grid step, too large for float16 "
                        f"scales; rescale the model's weights before quantizing")
    half = scale.astype(np.float16)
    low = half.astype(np.float32) < scale
    half[low] = np.nextafter(half[low], np.float16(np.inf))
    return half.astype(np.float32)


def grid_for_range(lo: np.ndarray, hi: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32, zero int32) of the grid covering [lo, hi] (lo <= 0 <= hi), elementwise."""
    maxq = (1 << bits) - 1
    if sym:
        scale = 2 * np.maximum(-lo, hi) / maxq
    else:
        scale = (hi - lo) / maxq
    scale = fp16_ceil(np.where(scale > 0, scale, 1).astype(np.float32))  # all-zero rows: any scale works
    if sym:
        zero = np.full(scale.shape, 1 << (bits - 1), dtype=np.int32)
    else:
        zero = np.clip(np.rint(-lo / scale), 0, maxq).astype(np.int32)
    return scale, zero


def _column(a: np.ndarray, ndim: int) -> np.ndarray:
    """a [rows] reshaped to broadcast against an array [rows, ...] of `ndim` dimensions."""
    return a.reshape(a.shape + (1,) * (ndim - 1))


def quantize_to_grid(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """codes uint8 [rows, ...] = clip(round(w / scale) + zero, 0, maxq), one grid per row of w."""
    maxq = (1 << bits) - 1
    q = np.rint(w / _column(scale, w.ndim)) + _column(zero, w.ndim)
    return np.clip(q, 0, maxq).astype(np.uint8)


def dequantize_grid(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """float32 [rows, ...] = (codes - zero) * scale, one grid per row."""
    return ((codes.astype(np.float32) - _column(zero, codes.ndim)) * _column(scale, codes.ndim)).astype(np.float32)


def grid_error(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, norm: float = NORM) -> np.ndarray:
    """float64 [rows]: sum over each row of |w - dequantize(quantize(w))| ** norm."""
    err = np.abs(dequantize_grid(quantize_to_grid(w, scale, zero, bits), scale, zero) - w)  # [rows, n]
    return np.sum(err ** np.float32(norm), axis=1, dtype=np.float64)


def find_grid(w: np.ndarray, bits: int, sym: bool, mse_clip: bool = False,
              grid: int = GRID, max_shrink: float = MAX_SHRINK, norm: float = NORM):
    """(scale float32 [rows], zero int32 [rows]): one grid per row of w [rows, n] (rows = outputs).

    The scale is float16-exact and positive. With mse_clip, the range of each
    row is shrunk to the factor (of 1, 1 - 1/grid, ... > 1 - max_shrink)
    with the smallest `grid_error` (see the module docstring).
    """
    w = np.asarray(w, dtype=np.float32)  # [rows, n]
    lo = np.minimum(w.min(axis=1), 0)  # [rows]
    hi = np.maximum(w.max(axis=1), 0)  # [rows]
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise UserError("the weights contain NaN or infinity; check the checkpoint before quantizing")
    scale, zero = grid_for_range(lo, hi, bits, sym)
    if not mse_clip:
        return scale, zero
    best = grid_error(w, scale, zero, bits, norm)  # [rows]
    for i in range(1, int(max_shrink * grid)):
        shrink = np.float32(1 - i / grid)
        s, z = grid_for_range(shrink * lo, shrink * hi, bits, sym)
        err = grid_error(w, s, z, bits, norm)  # [rows]
        better = err < best
        best[better], scale[better], zero[better] = err[better], s[better], z[better]
    return scale, zero
