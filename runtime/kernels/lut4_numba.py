"""Numba CPU kernels of the lut4 format (layout: runtime/formats/lut4.py).

Two paths, both parallel over output rows (`prange`) and both reading the
packed codes directly (no dequantized copy is kept between calls):

- `matmul_fused` (decode, a few input rows): each weight is looked up in the
  16-value table and multiplied into the dot product on the fly; the block's
  absmax is applied once per block.
- `matmul_prefill` (many input rows): tiles of whole output rows (about
  `PREFILL_TILE` floats) are dequantized into a scratch buffer, each tile
  multiplied by BLAS (`x @ tile.T`), tiles spread over one thread per core
  (runtime/kernels/prefill_threads.py).

The kernels read the absmax either as float32 or double-quantized (decoded
on the fly from the 8-bit code, the run's scale and the mean).

Decode with int8 activations (the default on CPUs with AVX-512 VNNI,
`runtime.formats.base.activation_mode`) goes through the uniform format's
integer kernel (runtime/kernels/uniform_int8_numba.py) with a table:
`decode_weight` repacks the codes once into the uniform format's 4-bit layout
(int32 words of eight codes of one output, packed along the input, first
code in the lowest nibble) and from there into the kernel's tiles, stores the table as signed 12-bit values rint(2047 * value /
max|value|) (`lut_table`) and one float32 scale absmax * max|value| / 2047
per block: the weight it multiplies by is within 0.5/2047 of max|value|
times absmax of the stored one.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from runtime.formats.lut4 import DQ_BLOCK_SIZE, dynamic_map, lut_table
from runtime.kernels.prefill_threads import run_tiles
from runtime.kernels import uniform_prefill_numba
from runtime.kernels.uniform_int8_numba import KernelWeight, block_weight
from runtime.kernels.uniform_numba import NO_PERM, RUN, readonly

PREFILL_TILE = 1 << 20  # floats in the dequantized tile of the prefill path (4 MiB)
NO_DQ_CODES = np.zeros((0, 0), dtype=np.uint8)  # stands for "absmax is stored as float32"
NO_ABSMAX = np.zeros((0, 0), dtype=np.float32)  # stands for "absmax is double-quantized"
NO_SCALES = np.zeros(0, dtype=np.float32)


@njit(cache=True, inline="always")
def _block_scale(o, b, absmax, absmax_q, dmap, absmax_scale, absmax_mean):
    """absmax of block b of row o, decoding the double-quantized form when absmax_q is not empty."""
    if absmax_q.shape[0] == 0:
        return absmax[o, b]
    run = (o * absmax_q.shape[1] + b) // DQ_BLOCK_SIZE
    return dmap[absmax_q[o, b]] * absmax_scale[run] + absmax_mean


@njit(cache=True, parallel=True)
def _fused(qweight, table, block_size, absmax, absmax_q, dmap, absmax_scale, absmax_mean, x, y):
    """y[r, o] = sum_i table[code(o, i)] * absmax(o, i // B) * x[r, i] for a few rows r.

    Two output rows per step share each load of x (the loop is bound by
    loads, not arithmetic); with an odd count the last row is done twice.
    """
    n_out, n_bytes = qweight.shape
    half = block_size // 2
    for pair in prange((n_out + 1) // 2):
        o0 = 2 * pair
        o1 = min(o0 + 1, n_out - 1)
        row0 = qweight[o0]  # [in/2]
        row1 = qweight[o1]  # [in/2]
        for r in range(x.shape[0]):
            xr = x[r]  # [in]
            acc0 = np.float32(0.0)
            acc1 = np.float32(0.0)
            for b in range(n_bytes // half):
                hi0 = np.float32(0.0)  # separate sums for high and low nibbles: more adds in flight
                lo0 = np.float32(0.0)
                hi1 = np.float32(0.0)
                lo1 = np.float32(0.0)
                for k in range(b * half, (b + 1) * half):
                    x_hi = xr[2 * k]
                    x_lo = xr[2 * k + 1]
                    c0 = row0[k]
                    c1 = row1[k]
                    hi0 += table[c0 >> 4] * x_hi
                    lo0 += table[c0 & 15] * x_lo
                    hi1 += table[c1 >> 4] * x_hi
                    lo1 += table[c1 & 15] * x_lo
                acc0 += (hi0 + lo0) * _block_scale(o0, b, absmax, absmax_q, dmap, absmax_scale, absmax_mean)
                acc1 += (hi1 + lo1) * _block_scale(o1, b, absmax, absmax_q, dmap, absmax_scale, absmax_mean)
            y[r, o0] = acc0
            y[r, o1] = acc1


@njit(cache=True, inline="always")
def _dequantize_row(qweight, table, block_size, absmax, absmax_q, dmap, absmax_scale, absmax_mean, row0, t, out):
    """out[t, :] = W[row0 + t, :] (float32, same products as the NumPy reference)."""
    half = block_size // 2
    o = row0 + t
    row = qweight[o]  # [in/2]
    for b in range(qweight.shape[1] // half):
        scale = _block_scale(o, b, absmax, absmax_q, dmap, absmax_scale, absmax_mean)
        for k in range(b * half, (b + 1) * half):
            c = row[k]
            out[t, 2 * k] = table[c >> 4] * scale
            out[t, 2 * k + 1] = table[c & 15] * scale


@njit(cache=True, nogil=True)
def _dequantize_rows_serial(qweight, table, block_size, absmax, absmax_q, dmap, absmax_scale, absmax_mean, row0,
                            out):
    """out[t, :] = W[row0 + t, :] for t < len(out), on the calling thread without the GIL (a tile of
    prefill_threads.run_tiles, or the whole matrix for `dequantize`)."""
    for t in range(out.shape[0]):
        _dequantize_row(qweight, table, block_size, absmax, absmax_q, dmap, absmax_scale, absmax_mean, row0, t, out)


def _absmax_args(packed) -> tuple:
    """(absmax, absmax_q, dmap, absmax_scale, absmax_mean) with placeholders for the unused form."""
    if packed.double_quant:
        return NO_ABSMAX, packed.absmax_q, dynamic_map(), packed.absmax_scale, np.float32(packed.absmax_mean[0])
    return packed.absmax, NO_DQ_CODES, dynamic_map(), NO_SCALES, np.float32(0.0)


def matmul_fused(packed, x: np.ndarray) -> np.ndarray:
    """y [m, out] = x [m, in] @ W.T, dequantizing inside the dot products (decode path)."""
    y = np.empty((x.shape[0], packed.shape[0]), dtype=np.float32)  # [m, out]
    _fused(packed.qweight, packed.table, packed.block_size, *_absmax_args(packed), x, y)
    return y


def dequantize(packed, row0: int = 0, rows: int | None = None) -> np.ndarray:
    """W[row0 : row0 + rows] [rows, in] float32, equal to the NumPy reference `packed.dequantize()`, on the
    calling thread: its caller, training, runs BLAS on every core, and a parallel region here waited for
    BLAS's spinning threads (and left Numba's spinning after it): the SmolLM2 NF4-DQ training step took
    1.25x as long."""
    n_out, n_in = packed.shape
    rows = n_out - row0 if rows is None else rows
    out = np.empty((rows, n_in), dtype=np.float32)  # [rows, in]
    _dequantize_rows_serial(packed.qweight, packed.table, packed.block_size, *_absmax_args(packed), row0, out)
    return out


def matmul_prefill(packed, x: np.ndarray) -> np.ndarray:
    """y [m, out] = x [m, in] @ W.T by tiles: dequantize a tile of output rows, multiply by BLAS, repeat."""
    n_out, n_in = packed.shape
    args = (packed.qweight, packed.table, packed.block_size, *_absmax_args(packed))
    tile_rows = min(max(PREFILL_TILE // n_in, 1), n_out)
    y = np.empty((x.shape[0], n_out), dtype=np.float32)  # [m, out]

    def fill(row0, rows, tile):  # tile [tile_rows, in]
        _dequantize_rows_serial(*args, row0, tile[:rows])

    def multiply(row0, rows, tile):
        np.matmul(x, tile[:rows].T, out=y[:, row0:row0 + rows])  # [m, rows]

    run_tiles(n_out, tile_rows, (tile_rows, n_in), fill, multiply)
    return y


@njit(cache=True, parallel=True)
def _repack(qweight, words):
    """words int32 [in/8, out] <- qweight uint8 [out, in/2]: word w of output o holds inputs 8w .. 8w+7,
    input 8w + j in nibble j (lowest first), as the uniform format packs 4-bit codes."""
    for w in prange(words.shape[0]):
        for o in range(qweight.shape[0]):
            v = np.uint32(0)
            for b in range(4):
                byte = np.uint32(qweight[o, 4 * w + b])
                v |= ((byte >> 4) | ((byte & 15) << 4)) << (8 * b)  # high nibble is the first input
            words[w, o] = np.int32(v)


def matmul_prefill_repacked(packed, weight: KernelWeight, x: np.ndarray, kernel: str) -> np.ndarray:
    """y [m, out] = x [m, in] @ W.T from the repacked codes (`decode_weight`), what prefill runs once they exist
    (so the stored qweight is not read again): in integers with two-byte activations and the 12-bit table
    on AVX-512 VNNI, else tiles of outputs dequantized and multiplied by BLAS on every core, each code's
    value the table's over the scale step, so that scale * value is the reference's absmax * table[code]
    within float32 rounding (runtime/kernels/uniform_prefill_numba.py)."""
    _, step = lut_table(packed.table)
    values = (packed.table / np.float32(step)).astype(np.float32)  # [16]
    return uniform_prefill_numba.matmul(weight, values, x, kernel)


def decode_weight(packed) -> KernelWeight:
    """The weight as the int8-activation decode kernel takes it (codes repacked, table as `lut_table`); its
    blocks must be whole runs of 32 inputs (`Lut4Tensor.int8_codes`)."""
    n_out, n_in = packed.shape
    words = np.empty((n_in // 8, n_out), dtype=np.int32)  # [runs*4, out] the uniform format's 4-bit layout
    _repack(packed.qweight, words)
    lut, step = lut_table(packed.table)
    scales = (packed.block_absmax() * step).T.astype(np.float32)  # [in/B, out]
    zeros = np.zeros(scales.shape, dtype=np.uint8)  # [in/B, out] the table's values are signed: no zero point
    return block_weight(words, scales, zeros, NO_PERM, n_in, 4, packed.block_size // RUN, readonly(lut))
