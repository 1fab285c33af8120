"""CuPy launchers of the lut4 CUDA kernels (source: lut4.cu; layout: runtime/formats/lut4.py).

CuPy is imported on first use, so this module imports on machines without a
GPU. A few input rows (decode) run the fused table-lookup matmul kernel;
more rows (prefill) dequantize W into a temporary float32 array and let
cuBLAS multiply (`x @ W.T`). The packed arrays must already be CuPy arrays
(`Lut4Tensor.to_device(cupy)`).
"""
from __future__ import annotations

import functools

import numpy as np

from runtime.formats.lut4 import DQ_BLOCK_SIZE, dynamic_map
from runtime.kernels import cuda_source

SOURCE = "lut4.cu"
WARPS_PER_BLOCK = 8  # output rows per thread block of lut4_matmul_fused
DEQUANT_THREADS = 256
MAX_GRID = 65535
DEFINES = {"WARPS_PER_BLOCK": WARPS_PER_BLOCK, "DQ_BLOCK_SIZE": DQ_BLOCK_SIZE}  # lut4.cu's constants
FUSED_MAX_ROWS = 4  # at most this many input rows: fused kernel; more: dequantize + cuBLAS (not tuned)


@functools.lru_cache(maxsize=None)
def _module():
    """The compiled lut4.cu (NVRTC, once per process)."""
    return cuda_source.module(SOURCE, DEFINES)


@functools.lru_cache(maxsize=None)
def _device_dynamic_map(device_id: int):
    """The dynamic map (a format constant) as a CuPy array on GPU `device_id`."""
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.asarray(dynamic_map())


def _absmax_args(packed) -> tuple:
    """(absmax, absmax_q, dmap, absmax_scale, absmax_mean, dq); unused pointers are any valid array."""
    import cupy

    if packed.double_quant:
        dmap = _device_dynamic_map(cupy.cuda.Device().id)
        return (packed.table, packed.absmax_q, dmap, packed.absmax_scale, packed.absmax_mean, np.int32(1))
    return (packed.absmax, packed.qweight, packed.table, packed.table, packed.table, np.int32(0))


def dequantize(packed):
    """W [out, in] float32 CuPy array (a temporary: nothing is kept)."""
    import cupy

    n_out, n_in = packed.shape
    w = cupy.empty((n_out, n_in), dtype=cupy.float32)  # [out, in]
    n_bytes = n_out * n_in // 2
    grid = min(-(-n_bytes // DEQUANT_THREADS), MAX_GRID)
    _module().get_function("lut4_dequantize")(
        (grid,), (DEQUANT_THREADS,),
        (packed.qweight, packed.table, *_absmax_args(packed), w, np.int64(n_bytes), np.int32(packed.block_size)))
    return w


def matmul(packed, x):
    """y [m, out] = x [m, in] @ W.T for a CuPy x."""
    import cupy

    n_out, n_in = packed.shape
    x = cupy.ascontiguousarray(x, dtype=cupy.float32)  # [m, in]
    if x.data.ptr % 16:  # the kernel reads x as float4
        x = x.copy()
    m = x.shape[0]
    if m > FUSED_MAX_ROWS:
        return x @ dequantize(packed).T  # [m, out] (cuBLAS)
    y = cupy.empty((m, n_out), dtype=cupy.float32)  # [m, out]
    grid = (-(-n_out // WARPS_PER_BLOCK), m)
    _module().get_function("lut4_matmul_fused")(
        grid, (32, WARPS_PER_BLOCK),
        (packed.qweight, packed.table, *_absmax_args(packed), x, y,
         np.int32(n_out), np.int32(n_in), np.int32(packed.block_size)))
    return y
