"""CuPy launchers of the int8 CUDA kernels (source: int8.cu; layout: runtime/formats/int8.py).

CuPy is imported on first use, so this module imports on machines without a
GPU. The outlier columns are found by `int8_outlier_columns`
(LLM.int8), the activations quantized per token (or per tensor) by
`int8_quantize_tokens` and multiplied by `int8_matmul_dp4a` (int32
accumulation with __dp4a), which adds the LLM.int8 outlier columns' float
product in the same pass (nothing comes back to the host). The packed arrays must already be CuPy arrays
(`Int8Tensor.to_device(cupy)`). The dp4a kernel is a GEMV run once per input
row; prefill has no tiled GEMM yet.
"""
from __future__ import annotations

import functools

import numpy as np

from runtime.kernels import cuda_source

SOURCE = "int8.cu"
THREADS = 256  # threads per row of int8_quantize_tokens
WARPS_PER_BLOCK = 8  # output rows per thread block of int8_matmul_dp4a
DEFINES = {"THREADS": THREADS, "WARPS_PER_BLOCK": WARPS_PER_BLOCK}  # int8.cu's constants (cuda_source.py)


@functools.lru_cache(maxsize=None)
def _module():
    """The compiled int8.cu (NVRTC, once per process)."""
    return cuda_source.module(SOURCE, DEFINES)


def outlier_mask(x, threshold: float | None):
    """uint8 [in] of a CuPy x [m, in] float32: 1 in the columns where some |x| >= threshold (none for None)."""
    import cupy

    m, n_in = x.shape
    mask = cupy.zeros(n_in, dtype=cupy.uint8)  # [in]
    if threshold is not None:
        _module().get_function("int8_outlier_columns")(
            (-(-n_in // THREADS),), (THREADS,), (x, np.int32(m), np.int32(n_in), np.float32(threshold), mask))
    return mask


def quantize_tokens(x, mask, per_tensor: bool):
    """(xq [m, in] int8, sx [m] float32) of a CuPy x [m, in] float32; mask: uint8 [in], 1 = outlier column."""
    import cupy

    m, n_in = x.shape
    if per_tensor:
        inliers = cupy.where(mask[None, :] != 0, cupy.float32(0), x)  # [m, in]
        tensor_absmax = cupy.abs(inliers).max(keepdims=True).reshape(1)  # [1]
    else:
        tensor_absmax = mask  # unused by the kernel
    xq = cupy.empty((m, n_in), dtype=cupy.int8)  # [m, in]
    sx = cupy.empty(m, dtype=cupy.float32)  # [m]
    _module().get_function("int8_quantize_tokens")(
        (m,), (THREADS,), (x, mask, tensor_absmax, np.int32(per_tensor), xq, sx, np.int32(n_in)))
    return xq, sx


def matmul(packed, x):
    """y [m, out] = x [m, in] @ W.T in W8A8 (plus the outlier columns in float) for a CuPy x."""
    import cupy

    n_out, n_in = packed.shape
    x = cupy.ascontiguousarray(x, dtype=cupy.float32)  # [m, in]
    m = x.shape[0]
    mask = outlier_mask(x, packed.outlier_threshold)  # [in] uint8
    xq, sx = quantize_tokens(x, mask, packed.activation == "tensor")
    sw = packed.scales  # [out], or [1]: one scale for the weight
    y = cupy.empty((m, n_out), dtype=cupy.float32)  # [m, out]
    _module().get_function("int8_matmul_dp4a")(
        (-(-n_out // WARPS_PER_BLOCK), m), (32, WARPS_PER_BLOCK),
        (packed.qweight, sw, xq, sx, mask, x, y, np.int32(n_out), np.int32(n_in),
         np.int32(packed.outlier_threshold is not None), np.int32(sw.size == n_out)))
    return y
