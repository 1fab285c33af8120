"""CuPy launcher of the randomized Hadamard transform kernel (source: hadamard.cu).

`hadamard_rows(x, pre, post, transpose)` = post ⊙ fast_hadamard(x ⊙ pre) over
the last axis of a CuPy x [m, n] (runtime/hadamard.py's convention), in one
launch: the row lives in shared memory, so n is limited to MAX_SHARED_FLOATS;
longer rows fall back to the CuPy array code of runtime.hadamard. The dense
K×K factor is copied to the GPU once per (K, device). CuPy is imported on
first use, so this module imports on machines without a GPU.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from runtime.hadamard import fast_hadamard, hadamard_factor, small_hadamard
from runtime.kernels import cuda_source

SOURCE = "hadamard.cu"
THREADS = 1024  # one block per row: as many threads as a block takes (one row is one block's work)
MAX_SHARED_FLOATS = 12 * 1024  # 48 KiB of shared memory per block, the default limit
DEFINES = {}  # hadamard.cu shares no constant with Python


@functools.lru_cache(maxsize=None)
def _kernel():
    """The compiled hadamard_rows (NVRTC, once per process)."""
    return cuda_source.module(SOURCE, DEFINES).get_function("hadamard_rows")


@functools.lru_cache(maxsize=None)
def _factor(k: int, device_id: int):
    """The K×K Hadamard factor as a float32 CuPy array on GPU `device_id`."""
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.asarray(small_hadamard(k), dtype=cupy.float32)  # [K, K]


def hadamard_rows(x, pre=None, post=None, transpose: bool = False):
    """post ⊙ (x ⊙ pre) Hᵀ / sqrt(n) (H / sqrt(n) when `transpose`) for a CuPy x [m, n]; signs [n] or None."""
    import cupy

    m, n = x.shape
    if n > MAX_SHARED_FLOATS:
        y = fast_hadamard(x if pre is None else x * pre, transpose=transpose)  # [m, n]
        return y if post is None else y * post
    k, p = hadamard_factor(n)
    x = cupy.ascontiguousarray(x, dtype=cupy.float32)  # [m, n]
    y = cupy.empty_like(x)  # [m, n]
    factor = _factor(k, cupy.cuda.Device().id)
    pre_arg, post_arg = (x if v is None else cupy.ascontiguousarray(v, dtype=cupy.float32) for v in (pre, post))
    _kernel()((m,), (THREADS,), (x, y, factor, pre_arg, post_arg, np.int32(pre is not None), np.int32(post is not None),
                                 np.int32(k), np.int32(1 << p), np.float32(1.0 / math.sqrt(n)), np.int32(transpose)),
              shared_mem=4 * n)
    return y
