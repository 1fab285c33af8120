"""Numba CPU kernel of the sparse (CSR) format (layout and NumPy reference: runtime/formats/sparse.py).

Follows the CSR product of SpQR's outliers (Dettmers et al. 2023, "SpQR: A
Sparse-Quantized Representation for Near-Lossless LLM Weight Compression",
§4.2). `add_product` adds x @ S.T into y: over output rows (in parallel
for many input rows, on one thread for a few); a row's few entries (about
1% of its weights) are read from cache for each input row, gathering x at
their columns.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

SERIAL_MAX_ROWS = 4  # input rows up to which the product runs on one thread


@njit(inline="always", fastmath=True)
def _add_row(row_ptr, col_idx, values, x, y, o):
    """y[r, o] += sum_k values[k] * x[r, col_idx[k]] over the entries k of row o, for every input row r."""
    for r in range(x.shape[0]):
        acc = np.float32(0)
        for k in range(row_ptr[o], row_ptr[o + 1]):
            acc += values[k] * x[r, np.int64(col_idx[k])]
        y[r, o] += acc


@njit(cache=True, parallel=True, fastmath=True)
def _add_rows(row_ptr, col_idx, values, x, y):
    """`_add_row` for every output row, in parallel."""
    for o in prange(row_ptr.shape[0] - 1):
        _add_row(row_ptr, col_idx, values, x, y, np.int64(o))


@njit(cache=True, fastmath=True)
def _add_rows_serial(row_ptr, col_idx, values, x, y):
    """`_add_row` for every output row, on one thread."""
    for o in range(row_ptr.shape[0] - 1):
        _add_row(row_ptr, col_idx, values, x, y, o)


def add_product(row_ptr: np.ndarray, col_idx: np.ndarray, values: np.ndarray, x: np.ndarray,
                y: np.ndarray) -> None:
    """y [m, out] += x [m, in] @ S.T for the CSR matrix S (row_ptr int32 [out+1], col_idx uint16 [nnz],
    values float32 [nnz]); x and y float32. A few input rows (decode) run on one thread: their work
    (about 1% of the weights) is smaller than waking the worker threads of a parallel loop."""
    (_add_rows_serial if x.shape[0] <= SERIAL_MAX_ROWS else _add_rows)(row_ptr, col_idx, values, x, y)
