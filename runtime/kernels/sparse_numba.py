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
(115k entries) in 1.1 ms where the gathers took 13 ms (2 cores).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

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
    """x [m, n] -> [n, m], blocks of 64 columns in parallel."""
    m, n = x.shape
    xt = np.empty((n, m), dtype=x.dtype)  # [n, m]
    for block in prange(-(-n // TRANSPOSE_BLOCK)):
        for r in range(m):
            for c in range(block * TRANSPOSE_BLOCK, min((block + 1) * TRANSPOSE_BLOCK, n)):
                xt[c, r] = x[r, c]
    return xt


@njit(cache=True, parallel=True, fastmath=True)
def _add_columns(row_ptr, col_idx, values, x, y, tasks):
    """y[:, o] += sum_k values[k] * x[:, col_idx[k]] over the entries k of each output row o: x transposed,
    so each entry's column is contiguous; blocks of OUT_BLOCK output rows split over `tasks` tasks, each
    block's sums [OUT_BLOCK, m] added to y row by row."""
    xt = _transposed(x)  # [in, m]
    n_out, m = row_ptr.shape[0] - 1, x.shape[0]
    n_blocks = -(-n_out // OUT_BLOCK)
    for t in prange(tasks):
        acc = np.empty((OUT_BLOCK, m), dtype=np.float32)  # [OUT_BLOCK, m] one block's sums
        for block in range(t * n_blocks // tasks, (t + 1) * n_blocks // tasks):
            o0 = block * OUT_BLOCK
            o1 = min(o0 + OUT_BLOCK, n_out)
            for o in range(o0, o1):
                sums = acc[o - o0]  # [m]
                sums[:] = 0
                for k in range(row_ptr[o], row_ptr[o + 1]):
                    value, column = values[k], xt[np.int64(col_idx[k])]  # column [m]
                    for r in range(m):
                        sums[r] += value * column[r]
            for r in range(m):
                for o in range(o0, o1):
                    y[r, o] += acc[o - o0, r]


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
    else:
        tasks = max(1, min(numba.get_num_threads(), -(-(row_ptr.shape[0] - 1) // OUT_BLOCK)))
        _add_columns(row_ptr, col_idx, values, x, y, tasks)
