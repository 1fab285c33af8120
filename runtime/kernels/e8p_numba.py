"""Numba CPU kernels of the e8p format (layout: runtime/formats/e8p.py; codebooks: runtime/e8p.py).

QuIP# (Tseng et al. 2024) inference: y = ((x ⊙ s_in) Hᵢᵀ) Ŵᵀ Hₒ ⊙ s_out.

- `hadamard_rows`: the randomized Hadamard transform of each row (signs, a
  Walsh–Hadamard butterfly per K-block, the dense K×K factor), parallel over rows.
- `matmul_fused` (decode, a few input rows): both transforms around a matvec
  that decodes each 16-bit code on the fly from a 256 × 8 table of source
  vectors times a 128 × 8 table of sign patterns (8 + 4 KiB, cache resident):
  coordinate k ≥ 1 takes the sign of code bit k, coordinate 0 the parity of
  the 7 sign bits (`e8p.sign_table`; the source table's coordinate 0 already
  carries the source parity, `e8p.signed_source_table`), and the ±¼ shift
  adds ±¼ Σ x over the group, summed once per call. A 1-bit E8 stage is a
  plain table lookup.
  Parallel over output rows.
- `matmul_prefill` (many rows): Ŵ is decoded tile by tile (about `PREFILL_TILE`
  floats) and multiplied by BLAS, with the transforms around it.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit, prange

from runtime import e8p
from runtime.hadamard import hadamard_factor, small_hadamard

SERIAL_MAX_ROWS = 4  # rows up to which the Hadamard transforms run on one thread
PREFILL_TILE = 1 << 20  # floats in the decoded tile of Ŵ in the prefill path (4 MiB)


@njit(inline="always")
def _hadamard_row(x, r, sign_before, sign_after, h_k, size, transpose, scale, out):
    """out[r] = ((H or Hᵀ) (x[r] ⊙ sign_before)) * scale ⊙ sign_after, H = h_k ⊗ Sylvester(size)."""
    n = x.shape[1]
    k = h_k.shape[0]
    buf = np.empty(n, dtype=np.float32)  # [n]
    for i in range(n):
        buf[i] = x[r, i] * sign_before[i]
    for a in range(k):
        base = a * size
        half = 1
        while half < size:
            for start in range(base, base + size, 2 * half):
                for i in range(start, start + half):
                    u = buf[i]
                    v = buf[i + half]
                    buf[i] = u + v
                    buf[i + half] = u - v
            half *= 2
    if k == 1:
        for i in range(n):
            out[r, i] = buf[i] * scale * sign_after[i]
        return
    for b in range(size):
        for a in range(k):
            acc = np.float32(0.0)
            for c in range(k):
                coef = h_k[c, a] if transpose else h_k[a, c]
                acc += coef * buf[c * size + b]
            out[r, a * size + b] = acc * scale * sign_after[a * size + b]


@njit(cache=True, parallel=True)
def _hadamard_rows(x, sign_before, sign_after, h_k, size, transpose, scale, out):
    """`_hadamard_row` for every row of x, in parallel (prefill)."""
    for r in prange(x.shape[0]):
        _hadamard_row(x, np.int64(r), sign_before, sign_after, h_k, size, transpose, scale, out)


@njit(cache=True)
def _hadamard_rows_serial(x, sign_before, sign_after, h_k, size, transpose, scale, out):
    """`_hadamard_row` for every row of x on one thread (decode: waking the workers costs more)."""
    for r in range(x.shape[0]):
        _hadamard_row(x, r, sign_before, sign_after, h_k, size, transpose, scale, out)


@njit(cache=True, inline="always")
def _shift(code):
    """The ±¼ shift of an E8P code (bit 0)."""
    return np.float32(0.25) if code & 1 else np.float32(-0.25)


@njit(cache=True)
def _group_sums(x, xsum):
    """xsum[r, g] = Σ x[r, 8g : 8g + 8]: what the ±¼ shift of a code in group g adds, per unit of shift."""
    for r in range(x.shape[0]):
        for g in range(xsum.shape[1]):
            acc = np.float32(0.0)
            for i in range(8):
                acc += x[r, 8 * g + i]
            xsum[r, g] = acc


@njit(cache=True, parallel=True)
def _e8p_stage_matvec(codes, table, signs, scale, x, xsum, y):
    """y[r, o] += scale * Σ_g <decode(codes[o, g]), x[r, 8g : 8g + 8]> for E8P codes (uint16).

    decode(c) = table[c >> 8] ⊙ signs[(c >> 1) & 127] ± ¼ (runtime/e8p.py `sign_table`): the dot of the
    first term is 8 products with no bit arithmetic between them (about twice as fast here as
    accumulating the parity bit by bit), the shift adds ±¼ xsum[r, g].
    """
    n_out, n_groups = codes.shape
    for o in prange(n_out):
        for r in range(x.shape[0]):
            acc = np.float32(0.0)
            for g in range(n_groups):
                code = np.int32(codes[o, g])
                row = code >> 8
                pattern = (code >> 1) & 127
                base = 8 * g
                dot = np.float32(0.0)
                for i in range(8):
                    dot += table[row, i] * signs[pattern, i] * x[r, base + i]
                acc += dot + _shift(code) * xsum[r, g]
            y[r, o] += scale * acc


@njit(cache=True, parallel=True)
def _table_stage_matvec(codes, table, scale, x, y):
    """y[r, o] += scale * Σ_g <table[codes[o, g]], x[r, 8g : 8g + 8]> for 1-bit E8 codes (uint8)."""
    n_out, n_groups = codes.shape
    for o in prange(n_out):
        for r in range(x.shape[0]):
            acc = np.float32(0.0)
            for g in range(n_groups):
                point = table[codes[o, g]]  # [8]
                for i in range(8):
                    acc += point[i] * x[r, 8 * g + i]
            y[r, o] += scale * acc


@njit(cache=True, parallel=True)
def _e8p_stage_decode(codes, table, scale, row0, out):
    """out[t, 8g + i] += scale * decode(codes[row0 + t, g])[i] (same products as the NumPy reference)."""
    n_groups = codes.shape[1]
    for t in prange(out.shape[0]):
        for g in range(n_groups):
            code = np.int32(codes[row0 + t, g])
            row = code >> 8
            flips = 0
            for i in range(1, 8):
                bit = (code >> i) & 1
                flips += bit
                out[t, 8 * g + i] += scale * (table[row, i] * np.float32(1 - 2 * bit) + _shift(code))
            out[t, 8 * g] += scale * (table[row, 0] * np.float32(1 - 2 * (flips & 1)) + _shift(code))


@njit(cache=True, parallel=True)
def _table_stage_decode(codes, table, scale, row0, out):
    """out[t, 8g + i] += scale * table[codes[row0 + t, g], i]."""
    n_groups = codes.shape[1]
    for t in prange(out.shape[0]):
        for g in range(n_groups):
            point = table[codes[row0 + t, g]]  # [8]
            for i in range(8):
                out[t, 8 * g + i] += scale * point[i]


@functools.lru_cache(maxsize=None)
def _stage_kinds(bits: int) -> tuple:
    """(table, is_e8p) of each stage of a `bits`-bit tensor."""
    tables = {"e8p": e8p.signed_source_table(), "e8_1bit": e8p.e8_1bit_codebook()}
    return tuple((tables[stage.name], stage.name == "e8p") for stage in e8p.stage_codebooks(bits))


def _stages(packed) -> list:
    """(codes, table, scale, is_e8p) of each stage."""
    return [(codes, table, np.float32(scale), is_e8p)
            for codes, (table, is_e8p), scale in zip(packed.stage_codes, _stage_kinds(packed.bits), packed.host_scales)]


def hadamard_rows(x: np.ndarray, n: int, sign_before, sign_after, transpose: bool) -> np.ndarray:
    """[m, n] float32: (x ⊙ sign_before) Hᵀ / sqrt(n) ⊙ sign_after (x H / sqrt(n) with `transpose`)."""
    k, p = hadamard_factor(n)
    out = np.empty((x.shape[0], n), dtype=np.float32)  # [m, n]
    kernel = _hadamard_rows_serial if x.shape[0] <= SERIAL_MAX_ROWS else _hadamard_rows
    kernel(np.ascontiguousarray(x, dtype=np.float32), sign_before, sign_after, small_hadamard(k), 1 << p,
           transpose, np.float32(1.0 / math.sqrt(n)), out)
    return out


def _transform_in(packed, x):
    ones = np.ones(packed.in_features, dtype=np.float32)  # [in]
    return hadamard_rows(x, packed.in_features, packed.signs_in, ones, False)  # [m, in]


def _transform_out(packed, y):
    ones = np.ones(packed.out_features, dtype=np.float32)  # [out]
    return hadamard_rows(y, packed.out_features, ones, packed.signs_out, True)  # [m, out]


def matmul_fused(packed, x: np.ndarray) -> np.ndarray:
    """y [m, out] = x [m, in] @ W.T, decoding the codes inside the dot products (decode path)."""
    x_rot = _transform_in(packed, x)  # [m, in]
    xsum = np.empty((x.shape[0], packed.in_features // 8), dtype=np.float32)  # [m, in/8]
    _group_sums(x_rot, xsum)
    y_rot = np.zeros((x.shape[0], packed.out_features), dtype=np.float32)  # [m, out]
    for codes, table, scale, is_e8p in _stages(packed):
        if is_e8p:
            _e8p_stage_matvec(codes, table, e8p.sign_table(), scale, x_rot, xsum, y_rot)
        else:
            _table_stage_matvec(codes, table, scale, x_rot, y_rot)
    return _transform_out(packed, y_rot)  # [m, out]


def decode_rows(packed, row0: int = 0, rows: int | None = None) -> np.ndarray:
    """Ŵ[row0 : row0 + rows] [rows, in] float32, equal to the NumPy reference `packed.decoded()`."""
    rows = packed.out_features - row0 if rows is None else rows
    out = np.zeros((rows, packed.in_features), dtype=np.float32)  # [rows, in]
    for codes, table, scale, is_e8p in _stages(packed):
        (_e8p_stage_decode if is_e8p else _table_stage_decode)(codes, table, scale, row0, out)
    return out


def matmul_prefill(packed, x: np.ndarray) -> np.ndarray:
    """y [m, out] = x [m, in] @ W.T: transform x, multiply by Ŵ decoded tile by tile (BLAS), transform back."""
    n_out, n_in = packed.shape
    x_rot = _transform_in(packed, x)  # [m, in]
    tile_rows = min(max(PREFILL_TILE // n_in, 1), n_out)
    y_rot = np.empty((x.shape[0], n_out), dtype=np.float32)  # [m, out]
    stages = _stages(packed)
    tile = np.empty((tile_rows, n_in), dtype=np.float32)  # [tile, in]
    for row0 in range(0, n_out, tile_rows):
        rows = min(tile_rows, n_out - row0)
        tile[:rows] = 0.0
        for codes, table, scale, is_e8p in stages:
            (_e8p_stage_decode if is_e8p else _table_stage_decode)(codes, table, scale, row0, tile[:rows])
        np.matmul(x_rot, tile[:rows].T, out=y_rot[:, row0:row0 + rows])  # [m, rows]
    return _transform_out(packed, y_rot)  # [m, out]
