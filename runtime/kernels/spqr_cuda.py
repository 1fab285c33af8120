"""CuPy launchers of the spqr CUDA kernels (source: spqr.cu; layout: runtime/formats/spqr.py), for SpQR
(Dettmers et al. 2023, §4.2).

CuPy is imported on first use, so this module imports on machines without a
GPU. One input row (decode) runs the fused dequantize-matvec kernel; more
rows (prefill) dequantize the dense part into a temporary float32 array in
storage order and let cuBLAS multiply. The outliers are then added by the CSR
kernel (sparse_cuda.py) with the corrections (value - dense value). The packed arrays must
already be CuPy arrays (`SpQRTensor.to_device(cupy)`).
"""
from __future__ import annotations

import functools

import numpy as np

from runtime.formats.spqr import FP16_STATS, HALF_RUN, QUANTIZED_STATS
from runtime.formats.uniform import RUN
from runtime.kernels import cuda_source
from runtime.kernels.sparse_cuda import sparse_add

SOURCE = "spqr.cu"
RUN_SPLIT = 8  # thread rows per block of spqr_matvec_*
THREADS = 128  # threads per block of the dequantize kernels
MIN_BLOCKS = 512  # split the input dimension until the matvec grid has about this many blocks
DEFINES = {"RUN": RUN, "HALF_RUN": HALF_RUN, "RUN_SPLIT": RUN_SPLIT, "FP16_STATS": FP16_STATS}  # spqr.cu's constants


@functools.lru_cache(maxsize=None)
def _module():
    """The compiled spqr.cu (NVRTC, once per process)."""
    return cuda_source.module(SOURCE, DEFINES)


def _stats_args(packed) -> tuple:
    """The statistics arguments of spqr.cu (STATS_PARAMS); unused arrays as a 1-element placeholder."""
    import cupy

    unused = cupy.zeros(1, dtype=cupy.uint32)
    st = packed.stats
    n_blocks = -(-packed.out_features // packed.stat_group)
    if packed.stat_bits == FP16_STATS:
        arrays = (unused,) * 6 + (st["scales"], st["zeros"])
        code_words = 0
    else:
        arrays = tuple(st[name] for name in QUANTIZED_STATS) + (unused, unused)
        code_words = st["scale_codes"].shape[1]
    return arrays + (np.int32(packed.stat_bits), np.int32(packed.stat_group), np.int32(code_words),
                     np.int32(n_blocks))


def _shape_args(packed) -> tuple:
    return np.int32(packed.in_features), np.int32(packed.out_features), np.int32(packed.group_size)


def dequantize_storage(packed):
    """W_d^T in storage row order, zero-padded: [n_runs * 32, out] float32 CuPy array (a temporary)."""
    import cupy

    n_pad = packed.qweight.shape[0] // packed.bits * RUN
    w = cupy.empty((n_pad, packed.out_features), dtype=cupy.float32)  # [in_pad, out]
    grid = (-(-packed.out_features // THREADS), n_pad // HALF_RUN)
    _module().get_function(f"spqr_dequantize_{packed.bits}")(
        grid, (THREADS,), (packed.qweight, *_stats_args(packed), w, *_shape_args(packed)))
    return w


def matmul(packed, x):
    """y [m, out] = x [m, in] @ W.T for a CuPy x: the dense part, then the outliers."""
    import cupy

    x = cupy.ascontiguousarray(x, dtype=cupy.float32)  # [m, in]
    n_pad = packed.qweight.shape[0] // packed.bits * RUN
    xs = cupy.zeros((x.shape[0], n_pad), dtype=cupy.float32)  # [m, in_pad] storage order, zero padded
    xs[:, :packed.in_features] = x[:, packed.perm]
    if x.shape[0] > 1:
        y = xs @ dequantize_storage(packed)  # [m, out] (cuBLAS)
    else:
        y = cupy.zeros((1, packed.out_features), dtype=cupy.float32)  # [1, out]
        columns = -(-packed.out_features // 32)
        n_halves = -(-packed.in_features // HALF_RUN)
        slices = max(1, min(-(-n_halves // RUN_SPLIT), MIN_BLOCKS // columns))
        _module().get_function(f"spqr_matvec_{packed.bits}")(
            (columns, slices), (32, RUN_SPLIT), (packed.qweight, *_stats_args(packed), xs, y, *_shape_args(packed)))
    outliers = packed.outliers
    sparse_add(outliers.row_ptr, outliers.col_idx, packed.corrections, x, y)
    return y
