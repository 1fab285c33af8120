"""CuPy launcher of the sparse (CSR) format's CUDA kernel (source: sparse.cu; layout: runtime/formats/sparse.py):
y += x S^T, SpQR's outliers (Dettmers et al. 2023, §3.2). CuPy is imported on first use."""
from __future__ import annotations

import functools

import numpy as np

from runtime.kernels import cuda_source

SOURCE = "sparse.cu"
THREADS = 128  # output rows per thread block
DEFINES = {}  # sparse.cu shares no constant with Python


@functools.lru_cache(maxsize=None)
def _module():
    """The compiled sparse.cu (NVRTC, once per process)."""
    return cuda_source.module(SOURCE, DEFINES)


def sparse_add(row_ptr, col_idx, values, x, y) -> None:
    """y [m, out] += x [m, in] @ S.T for the CSR matrix S (CuPy arrays; values float32, y contiguous)."""
    import cupy

    x = cupy.ascontiguousarray(x, dtype=cupy.float32)  # [m, in]
    m, n_in = x.shape
    n_out = row_ptr.shape[0] - 1
    if values.shape[0] == 0 or m == 0:
        return
    grid = (-(-n_out // THREADS), m)
    _module().get_function("sparse_add")(
        grid, (THREADS,), (row_ptr, col_idx, values, x, y, np.int32(n_in), np.int32(n_out), np.int32(m)))
