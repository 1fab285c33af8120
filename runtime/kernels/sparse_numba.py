"""Numba CPU kernel of the sparse (CSR) format (layout and NumPy reference: runtime/formats/sparse.py).

Follows the CSR product of SpQR's outliers (Dettmers et al. 2023, "SpQR: A
Sparse-Quantized Representation for Near-Lossless LLM Weight Compression",
§4.2). `add_product` adds x @ S.T into y, over output rows. A few input rows
(decode) go over the output rows, a row's few entries (about 1% of its
weights) read from cache for each input row, gathering x at their columns:
on one thread, or from PARALLEL_ENTRIES entries split over the threads by
entries (TinyLlama-1.1B's SpQR outliers, 1%: 18 -> 10 ms a token). Many
rows (prefill) take x transposed, so that each entry multiplies one
contiguous column of x by its value (m multiply-adds in vector lanes, not m
gathers), the output rows split over the cores: 128 rows of TinyLlama's MLP
(115k entries) in 1.1 ms where the gathers took 13 ms (2 cores). Both
transposes (x in, each block of 16 outputs' sums back into y) go 16 x 16
floats at a time through registers (`_transpose_block`), and a row's sums
take four entries a pass: 1.6 -> 1.0 ms for that MLP product, 1.7 -> 0.95
for its down projection (medians of 9 interleaved runs in one process).
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

SERIAL_MAX_ROWS = 4  # input rows up to which the product runs over output rows, x as it is
PARALLEL_ENTRIES = 1 << 14  # entries from which those rows are split over the threads
OUT_BLOCK = 16  # output rows whose sums (many input rows) are added to y together
TRANSPOSE_BLOCK = 64  # columns of x per task of its transpose


@njit(inline="always", fastmath=True)
def _add_row(row_ptr, col_idx, values, x, y, o):
    """y[r, o] += sum_k values[k] * x[r, col_idx[k]] over the entries k of row o, for every input row r."""
    for r in range(x.shape[0]):
        acc = np.float32(0)
        for k in range(row_ptr[o], row_ptr[o + 1]):
            acc += values[k] * x[r, np.int64(col_idx[k])]
        y[r, o] += acc


@njit(cache=True, parallel=True)
def _transposed(x):
    """x [m, n] (unit steps along a row) -> [n, m], blocks of 64 columns in parallel, whole 16 x 16 blocks
    through registers (`_transpose_block`)."""
    m, n = x.shape
    xt = np.empty((n, m), dtype=x.dtype)  # [n, m]
    whole = m - m % OUT_BLOCK  # rows in whole blocks of 16
    for block in prange(-(-n // TRANSPOSE_BLOCK)):
        c1 = min((block + 1) * TRANSPOSE_BLOCK, n)
        c0 = block * TRANSPOSE_BLOCK
        while c0 + OUT_BLOCK <= c1:
            for r0 in range(0, whole, OUT_BLOCK):
                _transpose_block(x, r0, c0, xt, c0, r0, False)
            for r in range(whole, m):
                for c in range(c0, c0 + OUT_BLOCK):
                    xt[c, r] = x[r, c]
            c0 += OUT_BLOCK
        for r in range(m):
            for c in range(c0, c1):
                xt[c, r] = x[r, c]
    return xt


@njit(cache=True, parallel=True, fastmath=True)
def _add_columns(row_ptr, col_idx, values, x, y, tasks):
    """y[:, o] += sum_k values[k] * x[:, col_idx[k]] over the entries k of each output row o: x transposed,
    so each entry's column is contiguous; blocks of OUT_BLOCK output rows split over `tasks` tasks, each
    block's sums [OUT_BLOCK, m] added to y through 16 x 16 transposes (`_transpose_block`)."""
    xt = _transposed(x)  # [in, m]
    n_out, m = row_ptr.shape[0] - 1, x.shape[0]
    n_blocks = -(-n_out // OUT_BLOCK)
    for t in prange(tasks):
        acc = np.empty((OUT_BLOCK, m), dtype=np.float32)  # [OUT_BLOCK, m] one block's sums
        for block in range(t * n_blocks // tasks, (t + 1) * n_blocks // tasks):
            o0 = block * OUT_BLOCK
            o1 = min(o0 + OUT_BLOCK, n_out)
            for o in range(o0, o1):
                _row_sums(row_ptr, col_idx, values, xt, o, acc[o - o0])
            first = 0  # the rows not yet added: whole blocks of 16 by transposes, then one by one
            if o1 - o0 == OUT_BLOCK:
                for r0 in range(0, m - OUT_BLOCK + 1, OUT_BLOCK):
                    _transpose_block(acc, 0, r0, y, r0, o0, True)
                first = m - m % OUT_BLOCK
            for r in range(first, m):
                for o in range(o0, o1):
                    y[r, o] += acc[o - o0, r]


@njit(inline="always", fastmath=True)
def _row_sums(row_ptr, col_idx, values, xt, o, sums):
    """sums [m] = sum_k values[k] * xt[col_idx[k]] over the entries k of output row o, four entries a pass
    (each pass reads and writes sums once: the loads and stores of sums had been as many as the products)."""
    sums[:] = 0
    k, end = row_ptr[o], row_ptr[o + 1]
    while k + 4 <= end:
        v0, v1, v2, v3 = values[k], values[k + 1], values[k + 2], values[k + 3]
        c0, c1 = xt[np.int64(col_idx[k])], xt[np.int64(col_idx[k + 1])]  # [m] each
        c2, c3 = xt[np.int64(col_idx[k + 2])], xt[np.int64(col_idx[k + 3])]
        for r in range(sums.shape[0]):
            sums[r] += v0 * c0[r] + v1 * c1[r] + v2 * c2[r] + v3 * c3[r]
        k += 4
    for j in range(k, end):
        value, column = values[j], xt[np.int64(col_idx[j])]  # column [m]
        for r in range(sums.shape[0]):
            sums[r] += value * column[r]


@intrinsic
def _transpose_block(typingctx, src, src_row, src_column, dst, dst_row, dst_column, add):
    """dst[dst_row + i, dst_column + j] = (or += with `add`) src[src_row + j, src_column + i] for i, j < 16 (float32
    arrays, any step between rows, unit steps along them): the 16 x 16 block transposed in registers, four rounds
    of two-source shuffles swapping blocks of 8, 4, 2, 1 across row pairs, then sixteen contiguous stores (element
    by element, one side read or written down its columns, a line per value)."""
    def codegen(context, builder, signature, args):
        floats = ir.VectorType(ir.FloatType(), OUT_BLOCK)
        i64 = ir.IntType(64)
        src_array, dst_array = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 3))

        def row_at(array, row, column):  # <16 x float>* to array[row, column]
            step = cgutils.unpack_tuple(builder, array.strides)[0]  # bytes from one row to the next
            data = builder.bitcast(array.data, ir.IntType(8).as_pointer())
            offset = builder.add(builder.mul(row, step), builder.mul(column, ir.Constant(i64, 4)))
            return builder.bitcast(builder.gep(data, [offset]), floats.as_pointer())

        rows = [builder.load(row_at(src_array, builder.add(args[1], ir.Constant(i64, j)), args[2]), align=4)
                for j in range(OUT_BLOCK)]
        block = OUT_BLOCK // 2
        while block:  # rows i and i + block swap their off-diagonal blocks of `block` columns
            low = ir.Constant(ir.VectorType(ir.IntType(32), OUT_BLOCK),
                              [c if not c & block else OUT_BLOCK + c - block for c in range(OUT_BLOCK)])
            high = ir.Constant(ir.VectorType(ir.IntType(32), OUT_BLOCK),
                               [c + block if not c & block else OUT_BLOCK + c for c in range(OUT_BLOCK)])
            for i in range(OUT_BLOCK):
                if not i & block:
                    j = i + block
                    rows[i], rows[j] = (builder.shuffle_vector(rows[i], rows[j], low),
                                        builder.shuffle_vector(rows[i], rows[j], high))
            block //= 2
        for i, row in enumerate(rows):
            at = row_at(dst_array, builder.add(args[4], ir.Constant(i64, i)), args[5])
            with builder.if_else(args[6]) as (add, store):
                with add:
                    builder.store(builder.fadd(builder.load(at, align=4), row), at, align=4)
                with store:
                    builder.store(row, at, align=4)
        return context.get_dummy_value()

    return types.void(src, types.int64, types.int64, dst, types.int64, types.int64, types.boolean), codegen


@njit(cache=True, fastmath=True)
def _add_rows_serial(row_ptr, col_idx, values, x, y):
    """`_add_row` for every output row, on one thread."""
    for o in range(row_ptr.shape[0] - 1):
        _add_row(row_ptr, col_idx, values, x, y, o)


@njit(cache=True, parallel=True, fastmath=True)
def _add_rows_parallel(row_ptr, col_idx, values, x, y, tasks):
    """`_add_row` for every output row, the rows split over `tasks` tasks of about equal entries."""
    n_out, nnz = row_ptr.shape[0] - 1, row_ptr[-1]
    for t in prange(tasks):
        first = np.searchsorted(row_ptr[:n_out], t * nnz // tasks)  # the first row starting at or past the share
        last = np.searchsorted(row_ptr[:n_out], (t + 1) * nnz // tasks) if t < tasks - 1 else n_out
        for o in range(first, last):
            _add_row(row_ptr, col_idx, values, x, y, o)


def add_product(row_ptr: np.ndarray, col_idx: np.ndarray, values: np.ndarray, x: np.ndarray,
                y: np.ndarray) -> None:
    """y [m, out] += x [m, in] @ S.T for the CSR matrix S (row_ptr int32 [out+1], col_idx uint16 [nnz],
    values float32 [nnz]); x and y float32. A few input rows (decode) go over the output rows, on one thread
    below PARALLEL_ENTRIES entries (less work than waking the worker threads of a parallel loop), else over
    the threads; more take x transposed, in parallel."""
    if x.shape[0] <= SERIAL_MAX_ROWS:
        threads = numba.get_num_threads()
        if values.shape[0] < PARALLEL_ENTRIES or threads == 1:
            _add_rows_serial(row_ptr, col_idx, values, x, y)
        else:
            _add_rows_parallel(row_ptr, col_idx, values, x, y, threads)
    elif y.strides[1] != y.itemsize:  # `_transpose_block` adds along rows of y with unit steps
        packed = np.ascontiguousarray(y)  # [m, out]
        add_product(row_ptr, col_idx, values, x, packed)
        y[...] = packed
    else:
        tasks = max(1, min(numba.get_num_threads(), -(-(row_ptr.shape[0] - 1) // OUT_BLOCK)))
        _add_columns(row_ptr, col_idx, values, np.ascontiguousarray(x), y, tasks)
