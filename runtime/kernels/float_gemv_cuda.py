"""CuPy launcher of the float GEMV kernels (source: float_gemv.cu): y = W x for one row, W float16 or float32.

What the CUDA-graph decode step (runtime/cuda_graph_step.py) runs for float
weights and a float head: CuPy refuses cuBLAS calls while a stream is being
captured. CuPy is imported on first use, so this module imports on machines
without a GPU.
"""
from __future__ import annotations

import functools

import numpy as np

from runtime.kernels import cuda_source

SOURCE = "float_gemv.cu"
WARPS_PER_BLOCK = 8  # output rows per thread block
DEFINES = {"WARPS_PER_BLOCK": WARPS_PER_BLOCK}  # float_gemv.cu's constants (cuda_source.py)
KERNELS = {np.dtype(np.float16): ("gemv_f16", 8), np.dtype(np.float32): ("gemv_f32", 4)}  # name, weights in 16 B


@functools.lru_cache(maxsize=None)
def _module():
    """The compiled float_gemv.cu (NVRTC, once per process)."""
    return cuda_source.module(SOURCE, DEFINES)


def takes(w) -> bool:
    """Whether `gemv` multiplies by w (a 2-D float16 or float32 CuPy array, C-contiguous)."""
    return w.ndim == 2 and w.dtype in KERNELS and w.flags.c_contiguous


def gemv(x, w):
    """y [out] float32 = w [out, in] @ x [in] for a float32 CuPy x and a weight `takes` accepts."""
    import cupy

    n_out, n_in = w.shape
    x = cupy.ascontiguousarray(x, dtype=cupy.float32).reshape(n_in)  # [in]
    name, per_load = KERNELS[w.dtype]
    vector = n_in % per_load == 0 and w.data.ptr % 16 == 0 and x.data.ptr % 16 == 0
    y = cupy.empty(n_out, dtype=cupy.float32)  # [out]
    _module().get_function(name)((-(-n_out // WARPS_PER_BLOCK),), (32, WARPS_PER_BLOCK),
                                 (w, x, y, np.int32(n_out), np.int32(n_in), np.int32(vector)))
    return y
