"""CuPy launchers of the uniform CUDA kernels (source: uniform.cu; layout: runtime/formats/uniform.py).

CuPy is imported on first use, so this module imports on machines without a
GPU. One input row (decode) runs the fused dequantize-matvec kernel; more
rows (prefill) dequantize W into a temporary float32 array in storage order
and let cuBLAS multiply. The packed arrays must already be CuPy arrays
(`UniformTensor.to_device(cupy)`).
"""
from __future__ import annotations

import functools

import numpy as np

from runtime.formats.uniform import RUN
from runtime.kernels import cuda_source

SOURCE = "uniform.cu"
RUN_SPLIT = 8  # thread rows per block of uniform_matvec_*
DEQUANT_THREADS = 128
MIN_BLOCKS = 512  # split the input dimension until the matvec grid has about this many blocks
DEFINES = {"RUN": RUN, "RUN_SPLIT": RUN_SPLIT}  # uniform.cu's constants (cuda_source.py)


@functools.lru_cache(maxsize=None)
def _module():
    """The compiled uniform.cu (NVRTC, once per process)."""
    return cuda_source.module(SOURCE, DEFINES)


def _kernel_args(packed) -> tuple:
    """(qweight, qzeros, scales, n_runs, out, zero words, group runs) as uniform.cu takes them."""
    n_runs = packed.qweight.shape[0] // packed.bits
    group_runs = n_runs if packed.group_size < 0 else packed.group_size // RUN
    return (packed.qweight, packed.qzeros, packed.scales, np.int32(n_runs), np.int32(packed.out_features),
            np.int32(packed.qzeros.shape[1]), np.int32(group_runs))


def _storage_input(packed, x):
    """x [m, in] -> [m, n_runs * 32] float32: gathered into storage order, zero padded to whole runs (x itself
    when it is in that order already)."""
    import cupy

    n_pad = packed.qweight.shape[0] // packed.bits * RUN
    if packed.perm is None and n_pad == packed.in_features:
        return cupy.ascontiguousarray(x, dtype=cupy.float32)  # already in storage order, whole runs
    xs = cupy.zeros((x.shape[0], n_pad), dtype=cupy.float32)  # [m, in_pad]
    xs[:, :packed.in_features] = x if packed.perm is None else x[:, packed.perm]
    return xs


def dequantize_storage(packed):
    """W^T in storage row order, zero-padded: [n_runs * 32, out] float32 CuPy array (a temporary)."""
    import cupy

    qweight, qzeros, scales, n_runs, n_out, zero_words, group_runs = _kernel_args(packed)
    w = cupy.empty((int(n_runs) * RUN, int(n_out)), dtype=cupy.float32)  # [in_pad, out]
    grid = (-(-int(n_out) // DEQUANT_THREADS), int(n_runs))
    _module().get_function(f"uniform_dequantize_{packed.bits}")(
        grid, (DEQUANT_THREADS,), (qweight, qzeros, scales, w, n_runs, n_out, zero_words, group_runs))
    return w


def matmul(packed, x):
    """y [m, out] = x [m, in] @ W.T for a CuPy x."""
    import cupy

    xs = _storage_input(packed, cupy.asarray(x, dtype=cupy.float32))  # [m, in_pad]
    if xs.shape[0] > 1:
        return xs @ dequantize_storage(packed)  # [m, out] (cuBLAS)
    qweight, qzeros, scales, n_runs, n_out, zero_words, group_runs = _kernel_args(packed)
    y = cupy.zeros((1, int(n_out)), dtype=cupy.float32)  # [1, out]
    columns = -(-int(n_out) // 32)
    slices = max(1, min(-(-int(n_runs) // RUN_SPLIT), MIN_BLOCKS // columns))
    _module().get_function(f"uniform_matvec_{packed.bits}")(
        (columns, slices), (32, RUN_SPLIT), (qweight, qzeros, scales, xs, y, n_runs, n_out, zero_words, group_runs))
    return y
