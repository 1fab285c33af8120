"""Numba CPU kernels of the uniform format (layout and NumPy reference: runtime/formats/uniform.py).

Two paths; neither keeps anything between calls:

- `matvec` (decode, one input row): parallel over chunks of output columns.
  qweight is [runs * bits, out], so a word row is contiguous over outputs:
  the inner loop runs over the chunk's outputs (SIMD), reads each packed word
  once and unpacks its codes with constant masks into one accumulator per
  output. A code is masked in place, not shifted down (code * 2**offset), and
  x is divided by 2**offset once per call instead (exact: a power of two,
  barring float32 underflow of |x| < 2**-97).
  Scale and zero are applied once per group (the standard folding):

      y[n] = sum_g s[g, n] * (sum_{k in g} q[k, n] x[k] - z[g, n] * sum_{k in g} x[k])

- `matmul` with many rows (prefill): dequantize a tile of output columns into
  a scratch buffer [in, cols] (4 MiB), multiply by BLAS, next tile; the
  tiles are spread over one thread per core (runtime/kernels/prefill_threads.py).

Float16 scales are converted with the CPU's half-precision instruction
(runtime/kernels/numba_common.py). The bit width is a run-time
argument and each helper branches on it once per run of 32 codes, passing a
literal width down, so one compiled signature serves every bit width.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from runtime.formats.uniform import RUN
from runtime.kernels.numba_common import scale_value
from runtime.kernels.prefill_threads import run_tiles

CHUNK = 256  # target output columns per parallel task of matvec
PREFILL_TILE = 1 << 20  # floats in the dequantized tile of the prefill path (4 MiB)
NO_PERM = np.zeros(0, dtype=np.int32)  # stands for "storage order is the column order"
NO_PERM.flags.writeable = False


@njit(inline="always")
def _code(word, shift, mask):
    """float32 of the code at bits [shift, shift + width) of an int32 word (mask = 2**width - 1)."""
    return np.float32(np.int32((word >> shift) & mask))


@njit(inline="always")
def _masked(word, shift, mask):
    """float32 of code * 2**shift for the code at bits [shift, shift + width) of an int32 word, below bit 31."""
    return np.float32(np.int32(word & (mask << shift)))


@njit(inline="always", fastmath=True)
def _dot_run_words(qweight, run, bits, x, acc, n0, m):
    """acc[i] += sum_k code(32 run + k, n0 + i) * x[32 run + k]; bits 2, 4 or 8 (no code straddles words).

    x is pre-scaled (`_storage_input`): all codes but a word's top one are masked in place, not shifted.
    """
    per_word = 32 // bits
    mask = (1 << bits) - 1
    for t in range(bits):
        row = run * bits + t
        base = run * RUN + t * per_word
        words = qweight[row, n0:n0 + m]  # [m] (a slice: non-negative indices below, no wraparound checks)
        for i in range(m):
            v = words[i]
            a = acc[i]
            for j in range(per_word - 1):
                a += _masked(v, j * bits, mask) * x[base + j]
            a += _code(v, 32 - bits, mask) * x[base + per_word - 1]
            acc[i] = a


@njit(inline="always")
def _words3(qweight, run, n0, m):
    """The three word rows [m] each of a 3-bit run for outputs n0 .. n0 + m - 1."""
    return qweight[3 * run, n0:n0 + m], qweight[3 * run + 1, n0:n0 + m], qweight[3 * run + 2, n0:n0 + m]


@njit(inline="always")
def _straddling3(v0, v1, v2):
    """Codes 10 and 21 of a 3-bit run's words v0, v1, v2 as float32: each straddles two words."""
    return (np.float32(np.int32(((v0 >> 30) & 3) | ((v1 & 1) << 2))),
            np.float32(np.int32(((v1 >> 31) & 1) | ((v2 & 3) << 1))))


@njit(inline="always", fastmath=True)
def _dot_run3(qweight, run, x, acc, n0, m):
    """`_dot_run_words` for 3 bits: 32 codes in three words, codes 10 and 21 straddle two words."""
    base = run * RUN
    words0, words1, words2 = _words3(qweight, run, n0, m)  # [m] each
    for i in range(m):
        v0, v1, v2 = words0[i], words1[i], words2[i]
        code10, code21 = _straddling3(v0, v1, v2)
        a = acc[i]
        for j in range(10):
            a += _masked(v0, 3 * j, 7) * x[base + j]
        a += code10 * x[base + 10]
        for j in range(10):
            a += _masked(v1, 3 * j + 1, 7) * x[base + 11 + j]
        a += code21 * x[base + 21]
        for j in range(9):
            a += _masked(v2, 3 * j + 2, 7) * x[base + 22 + j]
        a += _code(v2, 29, 7) * x[base + 31]
        acc[i] = a


@njit(inline="always")
def _dot_run(qweight, run, bits, x, acc, n0, m):
    """acc[i] += sum over the 32 codes of `run` of code * x, for outputs n0 .. n0 + m - 1."""
    if bits == 4:
        _dot_run_words(qweight, run, 4, x, acc, n0, m)
    elif bits == 2:
        _dot_run_words(qweight, run, 2, x, acc, n0, m)
    elif bits == 8:
        _dot_run_words(qweight, run, 8, x, acc, n0, m)
    else:
        _dot_run3(qweight, run, x, acc, n0, m)


@njit(inline="always")
def _deq_run_words(qweight, run, bits, s, sz, out, n0, m):
    """out[32 run + k, i] = code(32 run + k, n0 + i) * s[i] - sz[i]; bits 2, 4 or 8."""
    per_word = 32 // bits
    mask = (1 << bits) - 1
    for t in range(bits):
        row = run * bits + t
        base = run * RUN + t * per_word
        words = qweight[row, n0:n0 + m]  # [m]
        for i in range(m):
            v = words[i]
            for j in range(per_word):
                out[base + j, i] = _code(v, j * bits, mask) * s[i] - sz[i]


@njit(inline="always")
def _deq_run3(qweight, run, s, sz, out, n0, m):
    """`_deq_run_words` for 3 bits."""
    base = run * RUN
    words0, words1, words2 = _words3(qweight, run, n0, m)  # [m] each
    for i in range(m):
        v0, v1, v2 = words0[i], words1[i], words2[i]
        code10, code21 = _straddling3(v0, v1, v2)
        for j in range(10):
            out[base + j, i] = _code(v0, 3 * j, 7) * s[i] - sz[i]
        out[base + 10, i] = code10 * s[i] - sz[i]
        for j in range(10):
            out[base + 11 + j, i] = _code(v1, 3 * j + 1, 7) * s[i] - sz[i]
        out[base + 21, i] = code21 * s[i] - sz[i]
        for j in range(10):
            out[base + 22 + j, i] = _code(v2, 3 * j + 2, 7) * s[i] - sz[i]


@njit(inline="always")
def _deq_run(qweight, run, bits, s, sz, out, n0, m):
    """Dequantize the 32 rows of `run` for outputs n0 .. n0 + m - 1 into out[32 run : 32 run + 32, :m]."""
    if bits == 4:
        _deq_run_words(qweight, run, 4, s, sz, out, n0, m)
    elif bits == 2:
        _deq_run_words(qweight, run, 2, s, sz, out, n0, m)
    elif bits == 8:
        _deq_run_words(qweight, run, 8, s, sz, out, n0, m)
    else:
        _deq_run3(qweight, run, s, sz, out, n0, m)


@njit(inline="always")
def _unpack_run(words, w0, bits, out, o):
    """out[o + k] = code k of the run of 32 codes in words[w0 : w0 + bits] (uint32), k < 32."""
    mask = (1 << bits) - 1
    for k in range(RUN):
        offset = (k * bits) & 31
        w = w0 + ((k * bits) >> 5)
        v = np.int64(words[w]) >> offset
        if offset + bits > 32:
            v |= np.int64(words[w + 1]) << (32 - offset)
        out[o + k] = np.float32(v & mask)


@njit(inline="always")
def group_grid(qzeros, scales, g, bits, sym, n0, m, s, z):
    """s[i], z[i] = float32 scale and zero of output n0 + i in group g (n0 a multiple of 32); scales
    as float16 bits (uint16) or float32."""
    row_scales = scales[g, n0:n0 + m]  # [m]
    for i in range(m):
        s[i] = scale_value(row_scales[i])
    if sym:
        z[:m] = 1 << (bits - 1)
        return
    zero_values(qzeros, g, bits, n0, m, z)


def zero_values(qzeros, g, bits, n0, m, z):
    """z[i] = zero point of output n0 + i in group g: qzeros packed uint32 codes, or float32 [groups, out]
    values (SpQR's decoded statistics); compiled through the overload below."""
    raise NotImplementedError("called from compiled code only")


@overload(zero_values, inline="always")
def _zero_values(qzeros, g, bits, n0, m, z):
    if qzeros.dtype == types.float32:
        def read_values(qzeros, g, bits, n0, m, z):
            z[:m] = qzeros[g, n0:n0 + m]
        return read_values
    return _unpack_zeros


def _unpack_zeros(qzeros, g, bits, n0, m, z):
    """z[i] = the packed zero code of output n0 + i in group g (qzeros uint32 [groups, ceil(out/32) * bits])."""
    row = qzeros[g]  # [ceil(out/32) * bits] uint32
    for r in range(-(-m // RUN)):
        w0 = (n0 // RUN + r) * bits
        if bits == 4:
            _unpack_run(row, w0, 4, z, r * RUN)
        elif bits == 2:
            _unpack_run(row, w0, 2, z, r * RUN)
        elif bits == 8:
            _unpack_run(row, w0, 8, z, r * RUN)
        else:
            _unpack_run(row, w0, 3, z, r * RUN)


@njit(cache=True, fastmath=True)
def _matvec_chunk(qweight, qzeros, scales, xs, xsum, bits, group_runs, sym, n0, width, y):
    """y[n0 : n0 + width] of `_matvec` (xs, xsum: from `_storage_input`)."""
    n_runs = qweight.shape[0] // bits
    m = min(width, qweight.shape[1] - n0)
    acc = np.empty(width, dtype=np.float32)  # [width] sum_k q x of the current group
    total = np.zeros(width, dtype=np.float32)  # [width]
    s = np.empty(width, dtype=np.float32)  # [width]
    z = np.empty(width, dtype=np.float32)  # [width]
    for g in range(scales.shape[0]):
        acc[:] = 0
        for run in range(g * group_runs, min(n_runs, (g + 1) * group_runs)):
            _dot_run(qweight, run, bits, xs, acc, n0, m)
        group_grid(qzeros, scales, g, bits, sym, n0, m, s, z)
        for i in range(m):
            total[i] += s[i] * (acc[i] - z[i] * xsum[g])
    y[n0:n0 + m] = total[:m]


@njit(cache=True)
def storage_input(x, perm, n_runs):
    """x [in] gathered into storage order (perm; empty: identity), zero-padded to whole runs: [runs*32]."""
    xs = np.zeros(n_runs * RUN, dtype=np.float32)  # [runs*32]
    if perm.shape[0] > 0:
        for k in range(perm.shape[0]):
            xs[k] = x[perm[k]]
    else:
        xs[:x.shape[0]] = x
    return xs


@njit(cache=True)
def _storage_input(x, perm, bits, n_runs, group_runs, n_groups):
    """(x' [runs*32], xsum [n_groups]) for `_matvec_chunk`: x [in] gathered into storage order,
    zero-padded to whole runs, its sum over each group; then each x'[k] whose code sits below bit
    31 of one word (bit offset o = k * bits % 32, o + bits < 32) is divided by 2**o, because the
    kernel reads that code as code * 2**o (masked in place, not shifted)."""
    xs = storage_input(x, perm, n_runs)  # [runs*32]
    xsum = np.zeros(n_groups, dtype=np.float32)  # [n_groups]
    for k in range(n_runs * RUN):
        xsum[k // (RUN * group_runs)] += xs[k]
        offset = k * bits % 32
        if offset + bits < 32:
            xs[k] *= np.float32(1.0 / (1 << offset))
    return xs, xsum


@njit(cache=True, parallel=True)
def _matvec(qweight, qzeros, scales, x, perm, bits, group_runs, sym, threads):
    """y [out] = W x for one input row x [in]; perm [in] is the storage order (empty: identity).

    qzeros is viewed as uint32, scales as uint16 (float16 bits); group_runs
    is the number of 32-code runs per group; `threads` the parallel thread count.
    """
    n_out = qweight.shape[1]
    xs, xsum = _storage_input(x, perm, bits, qweight.shape[0] // bits, group_runs, scales.shape[0])
    # chunks of whole runs of 32 outputs, a multiple of the thread count of them
    n_chunks = -(-(-(-n_out // CHUNK)) // threads) * threads
    width = -(-(-(-n_out // n_chunks)) // RUN) * RUN
    y = np.empty(n_out, dtype=np.float32)  # [out]
    for c in prange(-(-n_out // width)):
        _matvec_chunk(qweight, qzeros, scales, xs, xsum, bits, group_runs, sym, c * width, width, y)
    return y


@njit(cache=True)
def _dequantize_run(qweight, qzeros, scales, bits, group_runs, sym, run, n0, m, out):
    """out[32 run + k, i] = W[n0 + i, perm[32 run + k]] for k < 32, i < m (padding rows: code 0)."""
    width = -(-m // RUN) * RUN
    s = np.empty(width, dtype=np.float32)  # [width]
    z = np.empty(width, dtype=np.float32)  # [width]
    group_grid(qzeros, scales, run // group_runs, bits, sym, n0, m, s, z)
    sz = s * z  # [width]
    _deq_run(qweight, run, bits, s, sz, out, n0, m)


@njit(cache=True, nogil=True)
def _dequantize_tile_serial(qweight, qzeros, scales, bits, group_runs, sym, n0, m, out):
    """out[k, i] = W[n0 + i, perm[k]] for every storage position k (padded to whole runs) and i < m, on the
    calling thread without the GIL (a tile of prefill_threads.run_tiles, or `dequantize_storage`)."""
    for run in range(qweight.shape[0] // bits):
        _dequantize_run(qweight, qzeros, scales, bits, group_runs, sym, run, n0, m, out)


def readonly(x):
    """A read-only view of x: read-only and writable inputs then share one compiled signature."""
    view = x.view()
    view.flags.writeable = False
    return view


def kernel_arrays(packed) -> tuple:
    """(qweight, qzeros as uint32, scales as uint16 (float16 bits), perm) as the kernels take them
    (read-only views: UniformTensor keeps its arrays read-only)."""
    perm = NO_PERM if packed.perm is None else packed.perm
    return (readonly(packed.qweight), readonly(packed.qzeros.view(np.uint32)),
            readonly(packed.scales.view(np.uint16)), perm)


def group_runs(packed) -> int:
    """32-code runs per group (all runs per row)."""
    return -(-packed.in_features // RUN) if packed.group_size < 0 else packed.group_size // RUN


def matvec(packed, x: np.ndarray) -> np.ndarray:
    """y [out] = W x for x [in] float32 (the fused decode kernel)."""
    qweight, qzeros, scales, perm = kernel_arrays(packed)
    return _matvec(qweight, qzeros, scales, readonly(x), perm, packed.bits, group_runs(packed),
                   packed.sym, numba.get_num_threads())


def dequantize_storage(packed, n0: int = 0, cols: int | None = None) -> np.ndarray:
    """W[n0 : n0 + cols].T in storage row order, zero-padded: [ceil(in/32) * 32, cols] float32, on the calling
    thread (its caller is training, which runs BLAS on every core: runtime/kernels/lut4_numba.py `dequantize`)."""
    qweight, qzeros, scales, _ = kernel_arrays(packed)
    cols = packed.out_features - n0 if cols is None else cols
    out = np.empty((qweight.shape[0] // packed.bits * RUN, cols), dtype=np.float32)  # [in_pad, cols]
    _dequantize_tile_serial(qweight, qzeros, scales, packed.bits, group_runs(packed), packed.sym, n0, cols, out)
    return out


def matmul(packed, x: np.ndarray) -> np.ndarray:
    """y [m, out] = x [m, in] @ W.T for float32 x: `matvec` for one row, else dequantized tiles + BLAS."""
    if x.shape[0] == 1:
        return matvec(packed, x[0])[None]
    qweight, qzeros, scales, _ = kernel_arrays(packed)
    n_pad = qweight.shape[0] // packed.bits * RUN
    n_out = packed.out_features
    xs = np.zeros((x.shape[0], n_pad), dtype=np.float32)  # [m, in_pad] storage order, zero padded
    xs[:, :packed.in_features] = x if packed.perm is None else x[:, packed.perm]
    width = min(n_out, max(RUN, PREFILL_TILE // n_pad // RUN * RUN))
    y = np.empty((x.shape[0], n_out), dtype=np.float32)  # [m, out]
    grid = (packed.bits, group_runs(packed), packed.sym)

    def fill(n0, cols, tile):  # tile [in_pad, width]
        _dequantize_tile_serial(qweight, qzeros, scales, *grid, n0, cols, tile)

    def multiply(n0, cols, tile):
        np.matmul(xs, tile[:, :cols], out=y[:, n0:n0 + cols])  # [m, cols]

    run_tiles(n_out, width, (n_pad, width), fill, multiply)
    return y
