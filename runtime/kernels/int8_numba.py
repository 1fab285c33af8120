"""Numba CPU kernels of the int8 format (layout and definition: runtime/formats/int8.py).

Each kernel equals its NumPy counterpart in the format module bit for bit:

- `quantize_tokens`: activations x [m, in] -> int8 xq and scales sx, per
  token or per tensor, outlier columns zeroed (`quantize_activations`).
- `int_matmul_decode` / `int_matmul_prefill`: acc[r, o] = sum_i xq[r, i] *
  qweight[o, i] accumulated in int32 (exact), parallel over output rows
  (`prange`). Decode (a few input rows) makes one pass over each weight row
  per input row; prefill (many rows) works on blocks of `ROW_BLOCK` weight
  rows times `TOKEN_BLOCK` input rows, so each block of W is read from
  memory once per block of tokens and stays in cache. On AVX-512 VNNI the
  prefill takes SQUARE x SQUARE weight and input rows at a time
  (`_dot_square_vnni`): each 64-byte load meets SQUARE rows of the other
  side in `vpdpbusd`, 16 sums in registers, one horizontal sum each at the
  end. A 128-row product of TinyLlama's MLP shape 20.3 -> 8.3 ms; SmolLM2
  int8 prefill 430 -> 800 tok/s (2 cores).
- `apply_scales`: y[r, o] = float32(acc[r, o]) * sx[r] * sw[o].
- `matvec` (decode, one input row): all of the above in one call, outlier
  columns included (their float product added in the same pass). The
  integer dot product of a weight row runs 64 bytes at a time on AVX-512
  VNNI (`vpdpbusd` multiplies unsigned by signed bytes, so the weight bytes
  w are flipped to w + 128 with one xor and 128 * sum(xq) is taken off the
  exact int32 sum), or in the portable loop (`_dot`) elsewhere; both give
  the same int32 as the format's definition, bit for bit. Products of fewer
  than PARALLEL_BYTES weight bytes run on the calling thread (a parallel
  region costs more), larger ones over the output rows.

The integer dot products are kept apart from the float scaling: with both
in one loop LLVM stops vectorizing the int8 dot product (measured 3x slower).
The outlier columns' float product is added by NumPy in the format module.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from runtime.kernels.uniform_int8_numba import available_kernels

QMAX = np.float32(127.0)
ROW_BLOCK = 16  # weight rows per prefill block
TOKEN_BLOCK = 32  # input rows per prefill block
SQUARE = 4  # weight rows x input rows whose dot products the VNNI prefill keeps in registers together
VNNI_BYTES = 64  # weight bytes per vpdpbusd
PARALLEL_BYTES = 32 << 10  # weight bytes below which `matvec` runs on the calling thread


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
def _prefill(qweight, xq, acc, vnni):
    """acc [m, out] by blocks of ROW_BLOCK output rows x TOKEN_BLOCK input rows, parallel over row blocks;
    with `vnni`, SQUARE x SQUARE pairs of weight and input rows at a time (`_dot_square_vnni`: each 64-byte
    load meets SQUARE rows of the other side), their whole 64-byte chunks by vpdpbusd and the rest in
    the portable loop."""
    n_out, m = qweight.shape[0], xq.shape[0]
    chunks = qweight.shape[1] // VNNI_BYTES if vnni else 0
    bias = np.empty(m, dtype=np.int32)  # [m] each row's `_chunk_bias`
    for r in range(m):
        bias[r] = _chunk_bias(xq[r], chunks)
    for block in prange((n_out + ROW_BLOCK - 1) // ROW_BLOCK):
        o0 = block * ROW_BLOCK
        o1 = min(o0 + ROW_BLOCK, n_out)
        for r0 in range(0, m, TOKEN_BLOCK):
            r1 = min(r0 + TOKEN_BLOCK, m)
            for o in range(o0, o1, SQUARE):
                for r in range(r0, r1, SQUARE):
                    square = chunks > 0 and o + SQUARE <= o1 and r + SQUARE <= r1
                    if square:
                        _dot_square_vnni(qweight, o, xq, r, chunks, acc)
                    for a in range(o, min(o + SQUARE, o1)):
                        for b in range(r, min(r + SQUARE, r1)):
                            if square:
                                acc[b, a] += _tail_dot(qweight, a, xq[b], chunks * VNNI_BYTES) - bias[b]
                            else:
                                acc[b, a] = _dot(xq[b], qweight[a])


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


def int_matmul_prefill(qweight: np.ndarray, xq: np.ndarray, kernel: str = "portable") -> np.ndarray:
    """acc [m, out] int32, as `int_matmul_decode`, blocked for many input rows (prefill path); kernel
    "avx512vnni": squares of rows by vpdpbusd (`_dot_square_vnni`), else the portable loop."""
    acc = np.empty((xq.shape[0], qweight.shape[0]), dtype=np.int32)  # [m, out]
    _prefill(qweight, xq, acc, kernel == "avx512vnni")
    return acc


def apply_scales(acc: np.ndarray, sx: np.ndarray, sw: np.ndarray) -> np.ndarray:
    """y [m, out] float32 = float32(acc) * sx[:, None] * sw[None, :]."""
    y = np.empty(acc.shape, dtype=np.float32)  # [m, out]
    _scale(acc, sx, sw, y)
    return y


@intrinsic
def _dot_vnni_biased(typingctx, qweight, o, xq, chunks):
    """int32 sum_{k < 64 chunks} (qweight[o, k] + 128) * xq[k] by vpdpbusd, 64 bytes per step (qweight int8
    [out, in] C-contiguous, xq int8 [in]); compiled to 0 on a CPU without AVX-512 VNNI (never called there)."""
    def codegen(context, builder, signature, args):
        if "avx512vnni" not in available_kernels():
            return ir.Constant(ir.IntType(32), 0)
        q_array = context.make_array(signature.args[0])(context, builder, args[0])
        x_data = context.make_array(signature.args[2])(context, builder, args[2]).data
        n_cols = cgutils.unpack_tuple(builder, q_array.shape)[1]
        words = ir.VectorType(ir.IntType(32), 16)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(words, [words] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")
        acc = cgutils.alloca_once_value(builder, ir.Constant(words, None))
        row = builder.gep(q_array.data, [builder.mul(args[1], n_cols)])
        flip = ir.Constant(words, [0x80808080 - (1 << 32)] * 16)  # xor 0x80 in every byte: w -> w + 128
        with cgutils.for_range(builder, args[3]) as loop:
            k = builder.mul(loop.index, ir.Constant(loop.index.type, VNNI_BYTES))
            w = builder.load(builder.bitcast(builder.gep(row, [k]), words.as_pointer()), align=1)
            x = builder.load(builder.bitcast(builder.gep(x_data, [k]), words.as_pointer()), align=1)
            builder.store(builder.call(fn, [builder.load(acc), builder.xor(w, flip), x]), acc)
        total = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), [words]),
                                               "llvm.vector.reduce.add.v16i32")
        return builder.call(total, [builder.load(acc)])

    return types.int32(qweight, types.int64, xq, types.int64), codegen


@intrinsic
def _dot_square_vnni(typingctx, qweight, o, xq, r, chunks, acc):
    """acc[r + j, o + i] = sum_{k < 64 chunks} (qweight[o + i, k] + 128) * xq[r + j, k] for i, j < SQUARE by
    vpdpbusd (qweight int8 [out, in], xq int8 [m, in], acc int32 [m, out], all C-contiguous): each 64-byte
    load of a weight row or an input row meets the SQUARE rows of the other side, SQUARE² sums in
    registers; compiled to nothing on a CPU without AVX-512 VNNI (never called there)."""
    def codegen(context, builder, signature, args):
        if "avx512vnni" not in available_kernels():
            return context.get_dummy_value()
        i8, i32 = ir.IntType(8), ir.IntType(32)
        q_array, x_array, a_array = (context.make_array(signature.args[i])(context, builder, args[i])
                                     for i in (0, 2, 5))
        n_cols = cgutils.unpack_tuple(builder, q_array.shape)[1]
        n_out = cgutils.unpack_tuple(builder, a_array.shape)[1]
        words = ir.VectorType(i32, 16)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(words, [words] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")

        def row(array, index):  # i8* to row `index` of an [_, in] int8 array
            return builder.gep(builder.bitcast(array.data, i8.as_pointer()), [builder.mul(index, n_cols)])

        w_rows = [row(q_array, builder.add(args[1], ir.Constant(args[1].type, i))) for i in range(SQUARE)]
        x_rows = [row(x_array, builder.add(args[3], ir.Constant(args[3].type, j))) for j in range(SQUARE)]
        sums = [[cgutils.alloca_once_value(builder, ir.Constant(words, None)) for _ in range(SQUARE)]
                for _ in range(SQUARE)]
        flip = ir.Constant(words, [0x80808080 - (1 << 32)] * 16)  # xor 0x80 in every byte: w -> w + 128

        def load(pointer, k):
            return builder.load(builder.bitcast(builder.gep(pointer, [k]), words.as_pointer()), align=1)

        with cgutils.for_range(builder, args[4]) as loop:
            k = builder.mul(loop.index, ir.Constant(loop.index.type, VNNI_BYTES))
            w = [builder.xor(load(p, k), flip) for p in w_rows]
            x = [load(p, k) for p in x_rows]
            for i in range(SQUARE):
                for j in range(SQUARE):
                    builder.store(builder.call(fn, [builder.load(sums[i][j]), w[i], x[j]]), sums[i][j])
        total = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [words]),
                                               "llvm.vector.reduce.add.v16i32")
        for i in range(SQUARE):
            for j in range(SQUARE):
                at = builder.add(builder.mul(builder.add(args[3], ir.Constant(args[3].type, j)), n_out),
                                 builder.add(args[1], ir.Constant(args[1].type, i)))
                builder.store(builder.call(total, [builder.load(sums[i][j])]), builder.gep(a_array.data, [at]))
        return context.get_dummy_value()

    return types.void(qweight, types.int64, xq, types.int64, types.int64, acc), codegen


@njit(inline="always")
def _chunk_bias(xq, chunks):
    """128 * sum of xq [in] over its first `chunks` 64-byte chunks: what `vpdpbusd` of the flipped weights
    (w + 128) adds to the exact int32 sum."""
    bias = np.int32(0)
    for i in range(chunks * VNNI_BYTES):
        bias += np.int32(xq[i])
    return bias * np.int32(128)


@njit(inline="always")
def _tail_dot(qweight, o, xq, start):
    """sum_{i >= start} qweight[o, i] * xq[i] in int32: the inputs past the whole 64-byte chunks."""
    acc = np.int32(0)
    for i in range(start, qweight.shape[1]):
        acc += np.int32(qweight[o, i]) * np.int32(xq[i])
    return acc


@njit(inline="always")
def _row_dot(qweight, o, xq, vnni, bias):
    """sum_i qweight[o, i] * xq[i] in int32, exact; vnni: the first 64-byte chunks by `_dot_vnni_biased`,
    whose bias 128 * sum(xq over those chunks) is `bias`."""
    if not vnni:
        return _tail_dot(qweight, o, xq, 0)
    chunks = qweight.shape[1] // VNNI_BYTES
    return _dot_vnni_biased(qweight, o, xq, chunks) - bias + _tail_dot(qweight, o, xq, chunks * VNNI_BYTES)


@njit(inline="always")
def _matvec_rows(qweight, sw, x, prepared, vnni, o0, o1, y):
    """y[o] = float32(row_dot) * sx * sw[o] + (sum over outlier columns j of x[j] * (qweight[o, j] * sw[o]))
    for o0 <= o < o1, with prepared = `_prepare_row` of x."""
    xq, sx, outliers, n_outliers, bias = prepared
    for o in range(o0, o1):
        value = np.float32(_row_dot(qweight, o, xq, vnni, bias)) * sx * sw[o]
        if n_outliers > 0:
            extra = np.float32(0.0)
            for t in range(n_outliers):
                j = outliers[t]
                extra += x[j] * (np.float32(qweight[o, j]) * sw[o])
            value += extra
        y[o] = value


@njit(cache=True)
def _prepare_row(qweight, x, threshold):
    """(xq [in] int8, sx, outlier columns [k] int64, their count, 128 * sum of xq over whole 64-byte chunks)
    of one row x [in] (threshold < 0: no outlier decomposition), as `_quantize` does it for one row."""
    n = x.shape[0]
    outliers = np.empty(n, dtype=np.int64)  # [in], the first k used
    flags = np.zeros(n, dtype=np.bool_)  # [in]
    k = 0
    if threshold >= 0:
        t = np.float32(threshold)  # compared in float32, as `outlier_columns`
        for i in range(n):
            if abs(x[i]) >= t:
                flags[i] = True
                outliers[k] = i
                k += 1
    xq = np.empty((1, n), dtype=np.int8)  # [1, in]
    sx = np.empty(1, dtype=np.float32)  # [1]
    _quantize(x.reshape(1, n), flags, False, xq, sx)
    return xq[0], sx[0], outliers, k, _chunk_bias(xq[0], n // VNNI_BYTES)


@njit(cache=True)
def _matvec_serial(qweight, sw, x, threshold, vnni):
    """`matvec` on the calling thread."""
    y = np.empty(qweight.shape[0], dtype=np.float32)  # [out]
    _matvec_rows(qweight, sw, x, _prepare_row(qweight, x, threshold), vnni, 0, qweight.shape[0], y)
    return y


@njit(cache=True, parallel=True)
def _matvec_parallel(qweight, sw, x, threshold, vnni, tasks):
    """`matvec` in one parallel region, the output rows split over `tasks` tasks."""
    prepared = _prepare_row(qweight, x, threshold)
    n_out = qweight.shape[0]
    y = np.empty(n_out, dtype=np.float32)  # [out]
    for t in prange(tasks):
        _matvec_rows(qweight, sw, x, prepared, vnni, t * n_out // tasks, (t + 1) * n_out // tasks, y)
    return y


@njit(cache=True)
def matvec_threads(qweight, sw, x, threshold, vnni, threads):
    """`matvec`'s product in one parallel region of `threads` tasks, or on the calling thread for one (and
    from Numba: runtime/kernels/decode_layers_numba.py)."""
    if threads > 1:
        return _matvec_parallel(qweight, sw, x, threshold, vnni, threads)
    return _matvec_serial(qweight, sw, x, threshold, vnni)


def matvec_arguments(qweight: np.ndarray, sw: np.ndarray, threshold: float | None, kernel: str) -> tuple:
    """`matvec_threads`'s arguments but x and the thread count, gathered once: (qweight, sw, threshold (-1.0:
    none), vnni, parallel: whether the weight has PARALLEL_BYTES for a parallel region)."""
    return (qweight, sw, -1.0 if threshold is None else float(threshold), kernel == "avx512vnni",
            qweight.nbytes >= PARALLEL_BYTES)


def run(arguments: tuple, x: np.ndarray) -> np.ndarray:
    """y [out] of `matvec_arguments` for one row x [in] float32 (C-contiguous), on every Numba thread where it
    says parallel."""
    qweight, sw, threshold, vnni, parallel = arguments
    return matvec_threads(qweight, sw, x, threshold, vnni, numba.get_num_threads() if parallel else 1)


def matvec(qweight: np.ndarray, sw: np.ndarray, x: np.ndarray, threshold: float | None, kernel: str) -> np.ndarray:
    """y [out] = the int8 format's product of one row x [in] float32 (C-contiguous) by qweight [out, in]
    with row scales sw [out] float32: activation quantized per token with outlier columns (|x| >= threshold;
    None: none) zeroed and multiplied in float. kernel: "avx512vnni" (dot products by vpdpbusd) or any
    other of uniform_int8_numba.KERNELS (the portable loop)."""
    return run(matvec_arguments(qweight, sw, threshold, kernel), x)
