"""Numba CPU kernels of the spqr format (layout and NumPy reference: runtime/formats/spqr.py).

SpQR's dense part (Dettmers et al. 2023, "SpQR: A Sparse-Quantized
Representation for Near-Lossless LLM Weight Compression", §3.2, §4.2) is
multiplied like the uniform format's codes, with the group's scale and zero
folded in once per group:

    y[n] = sum_g s[g, n] * (sum_{k in g} code[k, n] x'[k] - z[g, n] * sum_{k in g} x'[k])

(x' = x gathered into storage order by perm). The unit of work is a half run
of 16 codes (16 b <= 64 bits, read as one 64-bit value from at most two words):
group sizes are multiples of 16, so a half run lies in one group. s and z are
decoded from their packed codes and float16 step / low (or read as float16
with stat_bits 16) once per group and output. The format adds the outliers
last (SpQRTensor._add_outliers, the CSR kernel of runtime/kernels/sparse_numba.py)
with the corrections value - dense value, so each replaces the dense weight
at its position.

- `matvec` (decode, one input row): parallel over chunks of outputs; the
  inner loops run over the chunk's outputs (a packed word row is contiguous
  over outputs).
- `matmul_dense` with several rows (prefill): dequantize tiles of output columns
  into a scratch buffer [in, cols] (about 4 MiB) in storage order, multiply
  by BLAS, tiles spread over one thread per core (prefill_threads.py).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from runtime.formats.spqr import FP16_STATS, HALF_RUN, QUANTIZED_STATS
from runtime.formats.uniform import RUN
from runtime.kernels.numba_common import half_to_float
from runtime.kernels.prefill_threads import run_tiles

CHUNK = 256  # target output columns per parallel task of matvec
PREFILL_TILE = 1 << 20  # floats in the dequantized tile of the prefill path (4 MiB)
NO_CODES = np.zeros((0, 0), dtype=np.uint32)  # stands for "statistics kept as float16"
NO_HALVES = np.zeros((0, 0), dtype=np.uint16)  # stands for "statistics quantized"
for _empty in (NO_CODES, NO_HALVES):
    _empty.flags.writeable = False


@njit(inline="always")
def _half_bits(qweight, run, half, bits, n):
    """The 16 b bits of half run `half` (0 or 1) of output n, as an int64 (code k at bits [k b, k b + b))."""
    start = half * HALF_RUN * bits
    row = run * bits + (start >> 5)
    offset = start & 31
    value = np.int64(qweight[row, n]) & 0xFFFFFFFF
    if offset + HALF_RUN * bits > 32:
        value |= np.int64(qweight[row + 1, n]) << 32
    return value >> offset


@njit(inline="always", fastmath=True)
def _dot_half_bits(qweight, run, half, bits, xs, acc, n0, m):
    """acc[i] += sum_k code(16 (2 run + half) + k, n0 + i) * xs[16 (2 run + half) + k], 16 codes."""
    mask = (1 << bits) - 1
    base = (2 * run + half) * HALF_RUN
    for i in range(m):
        value = _half_bits(qweight, run, half, bits, n0 + i)
        a = acc[i]
        for k in range(HALF_RUN):
            a += np.float32((value >> (k * bits)) & mask) * xs[base + k]
        acc[i] = a


@njit(inline="always")
def _dot_half(qweight, run, half, bits, xs, acc, n0, m):
    """`_dot_half_bits` with the bit width a literal (one compiled body per width)."""
    if bits == 3:
        _dot_half_bits(qweight, run, half, 3, xs, acc, n0, m)
    elif bits == 4:
        _dot_half_bits(qweight, run, half, 4, xs, acc, n0, m)
    else:
        _dot_half_bits(qweight, run, half, 2, xs, acc, n0, m)


@njit(inline="always")
def _deq_half_bits(qweight, run, half, bits, s, z, out, n0, m):
    """out[16 (2 run + half) + k, i] = (code - z[i]) * s[i] for the 16 codes of a half run, i < m."""
    mask = (1 << bits) - 1
    base = (2 * run + half) * HALF_RUN
    for i in range(m):
        value = _half_bits(qweight, run, half, bits, n0 + i)
        for k in range(HALF_RUN):
            out[base + k, i] = (np.float32((value >> (k * bits)) & mask) - z[i]) * s[i]


@njit(inline="always")
def _deq_half(qweight, run, half, bits, s, z, out, n0, m):
    """`_deq_half_bits` with the bit width a literal."""
    if bits == 3:
        _deq_half_bits(qweight, run, half, 3, s, z, out, n0, m)
    elif bits == 4:
        _deq_half_bits(qweight, run, half, 4, s, z, out, n0, m)
    else:
        _deq_half_bits(qweight, run, half, 2, s, z, out, n0, m)


@njit(inline="always")
def _decode_stat(codes, step, low, g, stat_bits, stat_group, n0, m, out):
    """out[i] = low + code * step of output n0 + i in group g, one quantized statistic (codes as uint32
    words, step and low as float16 bits): each block's step and low converted once."""
    mask = (1 << stat_bits) - 1
    row = codes[g]  # [code words]
    for b in range(n0 // stat_group, (n0 + m - 1) // stat_group + 1):
        lo = half_to_float(low[g, b])
        st = half_to_float(step[g, b])
        for i in range(max(b * stat_group, n0) - n0, min((b + 1) * stat_group, n0 + m) - n0):
            p = (n0 + i) * stat_bits
            value = (np.int64(row[p >> 5]) & 0xFFFFFFFF) >> (p & 31)
            if (p & 31) + stat_bits > 32:
                value |= np.int64(row[(p >> 5) + 1]) << (32 - (p & 31))
            out[i] = lo + np.float32(value & mask) * st


@njit(inline="always")
def _group_stats(stats, g, stat_bits, stat_group, n0, m, s, z):
    """s[i], z[i] = decoded scale and zero of output n0 + i in group g.

    stats = (scale_codes, scale_step, scale_low, zero_codes, zero_step, zero_low, scales, zeros):
    codes as uint32 words, float16 arrays as uint16 bits; the unused ones empty.
    """
    scale_codes, scale_step, scale_low, zero_codes, zero_step, zero_low, scales, zeros = stats
    if stat_bits == FP16_STATS:
        for i in range(m):
            s[i] = half_to_float(scales[g, n0 + i])
            z[i] = half_to_float(zeros[g, n0 + i])
    else:
        _decode_stat(scale_codes, scale_step, scale_low, g, stat_bits, stat_group, n0, m, s)
        _decode_stat(zero_codes, zero_step, zero_low, g, stat_bits, stat_group, n0, m, z)


@njit(cache=True, fastmath=True)
def _matvec_chunk(qweight, stats, xs, xsum, bits, group_size, stat_bits, stat_group, n_in, n0, width, y):
    """y[n0 : n0 + width] of `_matvec`."""
    m = min(width, qweight.shape[1] - n0)
    acc = np.zeros(width, dtype=np.float32)  # [width] sum_k code x of the current group
    total = np.zeros(width, dtype=np.float32)  # [width]
    s = np.empty(width, dtype=np.float32)  # [width]
    z = np.empty(width, dtype=np.float32)  # [width]
    n_halves = -(-n_in // HALF_RUN)
    for h in range(n_halves):
        _dot_half(qweight, h // 2, h % 2, bits, xs, acc, n0, m)
        if ((h + 1) * HALF_RUN) % group_size == 0 or h == n_halves - 1:  # the group ends here
            g = h * HALF_RUN // group_size
            _group_stats(stats, g, stat_bits, stat_group, n0, m, s, z)
            for i in range(m):
                total[i] += s[i] * (acc[i] - z[i] * xsum[g])
                acc[i] = 0
    y[n0:n0 + m] = total[:m]


@njit(cache=True)
def _storage_input(x, perm, n_pad, group_size):
    """(xs [n_pad] = x [in] gathered into storage order and zero padded, xsum [n_groups] its group sums).

    Serial and apart from `_matvec`: in a parallel function every np.zeros is a parallel loop of its
    own, and each parallel region wakes the sleeping worker threads again (tens of microseconds).
    """
    n_in = perm.shape[0]
    xs = np.zeros(n_pad, dtype=np.float32)  # [runs*32]
    xsum = np.zeros(-(-n_in // group_size), dtype=np.float32)  # [n_groups]
    for k in range(n_in):
        xs[k] = x[perm[k]]
        xsum[k // group_size] += xs[k]
    return xs, xsum


@njit(cache=True, parallel=True)
def _matvec(qweight, stats, x, perm, bits, group_size, stat_bits, stat_group, threads):
    """y [out] = W_d x for one input row x [in] (the dense part); perm [in] the storage order."""
    n_in, n_out = perm.shape[0], qweight.shape[1]
    xs, xsum = _storage_input(x, perm, qweight.shape[0] // bits * RUN, group_size)  # [runs*32], [n_groups]
    # chunks of whole runs of 32 outputs, a multiple of the thread count of them
    n_chunks = -(-(-(-n_out // CHUNK)) // threads) * threads
    width = -(-(-(-n_out // n_chunks)) // RUN) * RUN
    y = np.empty(n_out, dtype=np.float32)  # [out]
    for c in prange(-(-n_out // width)):
        n0 = np.int64(c) * width  # the prange index is unsigned: times a signed int it would be a float
        _matvec_chunk(qweight, stats, xs, xsum, bits, group_size, stat_bits, stat_group, n_in, n0, width, y)
    return y


@njit(inline="always")
def _dequantize_half(qweight, stats, bits, group_size, stat_bits, stat_group, n_in, n0, m, h, out):
    """out[16 h + k, i] = W_d[n0 + i, perm[16 h + k]] for k < 16, i < m (0 past the input)."""
    if h >= -(-n_in // HALF_RUN):
        out[h * HALF_RUN:(h + 1) * HALF_RUN, :m] = 0
        return
    s = np.empty(m, dtype=np.float32)  # [m]
    z = np.empty(m, dtype=np.float32)  # [m]
    _group_stats(stats, h * HALF_RUN // group_size, stat_bits, stat_group, n0, m, s, z)
    _deq_half(qweight, h // 2, h % 2, bits, s, z, out, n0, m)


@njit(cache=True, parallel=True)
def _dequantize_tile(qweight, stats, bits, group_size, stat_bits, stat_group, n_in, n0, m, out):
    """out[k, i] = W_d[n0 + i, perm[k]] for every storage position k < in (rows past it: 0) and i < m."""
    for task in prange(out.shape[0] // HALF_RUN):
        # np.int64: the prange index is unsigned, mixed with signed ints it would give floats
        _dequantize_half(qweight, stats, bits, group_size, stat_bits, stat_group, n_in, n0, m, np.int64(task), out)


@njit(cache=True, nogil=True)
def _dequantize_tile_serial(qweight, stats, bits, group_size, stat_bits, stat_group, n_in, n0, m, out):
    """`_dequantize_tile` on the calling thread, without the GIL (prefill_threads.run_tiles)."""
    for h in range(out.shape[0] // HALF_RUN):
        _dequantize_half(qweight, stats, bits, group_size, stat_bits, stat_group, n_in, n0, m, h, out)


def _readonly(a):
    """A read-only view: read-only and writable inputs then share one compiled signature."""
    view = a.view()
    view.flags.writeable = False
    return view


def _stats(packed) -> tuple:
    """The statistics tuple `_group_stats` takes (codes as uint32, float16 as uint16 bits, unused: empty)."""
    st = packed.stats
    if packed.stat_bits == FP16_STATS:
        return (NO_CODES, NO_HALVES, NO_HALVES, NO_CODES, NO_HALVES, NO_HALVES,
                st["scales"].view(np.uint16), st["zeros"].view(np.uint16))
    words = tuple(st[name].view(np.uint32 if name.endswith("codes") else np.uint16) for name in QUANTIZED_STATS)
    return words + (NO_HALVES, NO_HALVES)


def _params(packed) -> tuple:
    return packed.bits, packed.group_size, packed.stat_bits, packed.stat_group


def matvec_dense(packed, x: np.ndarray) -> np.ndarray:
    """y [out] = W_d x for x [in] float32: the dense part alone (the fused decode kernel)."""
    return _matvec(packed.qweight, _stats(packed), _readonly(x), packed.perm, *_params(packed),
                   numba.get_num_threads())


def dequantize_storage(packed, n0: int = 0, cols: int | None = None) -> np.ndarray:
    """W_d[n0 : n0 + cols].T in storage row order, zero-padded: [ceil(in/32) * 32, cols] float32."""
    cols = packed.out_features - n0 if cols is None else cols
    out = np.empty((packed.qweight.shape[0] // packed.bits * RUN, cols), dtype=np.float32)  # [in_pad, cols]
    _dequantize_tile(packed.qweight, _stats(packed), *_params(packed), packed.in_features, n0, cols, out)
    return out


def matmul_dense(packed, x: np.ndarray) -> np.ndarray:
    """y [m, out] = x [m, in] @ W_d.T: `matvec_dense` for one row, else dequantized tiles + BLAS."""
    if x.shape[0] == 1:
        return matvec_dense(packed, x[0])[None]
    n_pad = packed.qweight.shape[0] // packed.bits * RUN
    n_out = packed.out_features
    xs = np.zeros((x.shape[0], n_pad), dtype=np.float32)  # [m, in_pad] storage order, zero padded
    xs[:, :packed.in_features] = x[:, packed.perm]
    width = min(n_out, max(RUN, PREFILL_TILE // n_pad // RUN * RUN))
    y = np.empty((x.shape[0], n_out), dtype=np.float32)  # [m, out]
    args = (packed.qweight, _stats(packed), *_params(packed), packed.in_features)

    def fill(n0, cols, tile):  # tile [in_pad, width]
        _dequantize_tile_serial(*args, n0, cols, tile)

    def multiply(n0, cols, tile):
        np.matmul(xs, tile[:, :cols], out=y[:, n0:n0 + cols])  # [m, cols]

    run_tiles(n_out, width, (n_pad, width), fill, multiply)
    return y

