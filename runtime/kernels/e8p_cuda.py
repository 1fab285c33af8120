"""CuPy launchers of the e8p CUDA kernels (source: e8p.cu; layout: runtime/formats/e8p.py).

QuIP# (Tseng et al. 2024) inference on the GPU: y = ((x ⊙ s_in) Hᵢᵀ) Ŵᵀ Hₒ ⊙ s_out.
The randomized Hadamard transforms run as one kernel launch each, signs fused
(`runtime.kernels.hadamard_cuda`). A few input
rows (decode) run the fused decode-and-multiply kernel once per RVQ stage;
more rows (prefill) decode Ŵ into a temporary float32 array and let cuBLAS
multiply. CuPy is imported on first use, so this module imports on machines
without a GPU. The packed arrays must already be CuPy arrays
(`E8PTensor.to_device(cupy)`).
"""
from __future__ import annotations

import functools

import numpy as np

from runtime import e8p_codebook
from runtime.kernels import cuda_source
from runtime.kernels.hadamard_cuda import hadamard_rows

SOURCE = "e8p.cu"
WARPS_PER_BLOCK = 8  # output rows per thread block of *_stage_matmul
DECODE_THREADS = 256
MAX_GRID = 65535
DEFINES = {"WARPS_PER_BLOCK": WARPS_PER_BLOCK,
           "TABLE_FLOATS": e8p_codebook.N_SOURCE * e8p_codebook.DIM}  # e8p.cu's constants: a [256, 8] table
FUSED_MAX_ROWS = 4  # at most this many input rows: fused kernels; more: decode Ŵ + cuBLAS (not tuned)
KERNELS = {"e8p": ("e8p_stage_matmul", "e8p_stage_decode"), "e8_1bit": ("table_stage_matmul", "table_stage_decode")}


@functools.lru_cache(maxsize=None)
def _module():
    """The compiled e8p.cu (NVRTC, once per process)."""
    return cuda_source.module(SOURCE, DEFINES)


@functools.lru_cache(maxsize=None)
def _device_tables(device_id: int, codebook: str) -> dict:
    """The tables of a codebook variant (format constants) as CuPy arrays on GPU `device_id`, by stage name."""
    import cupy

    with cupy.cuda.Device(device_id):
        return {"e8p": cupy.asarray(e8p_codebook.signed_source_table(codebook)),
                "e8_1bit": cupy.asarray(e8p_codebook.e8_1bit_codebook(codebook))}


def _stages(packed) -> list:
    """(codes, table, scale, kernel names) of each stage."""
    import cupy

    tables = _device_tables(cupy.cuda.Device().id, packed.codebook)
    stages = e8p_codebook.stage_codebooks(packed.bits, packed.codebook)
    return [(codes, tables[stage.name], np.float32(scale), KERNELS[stage.name])
            for codes, stage, scale in zip(packed.stage_codes, stages, packed.host_scales)]


def decoded(packed):
    """Ŵ [out, in] float32 CuPy array (a temporary: nothing is kept)."""
    import cupy

    n_out, n_in = packed.shape
    w_hat = cupy.empty((n_out, n_in), dtype=cupy.float32)  # [out, in]
    n_groups = n_out * n_in // e8p_codebook.DIM
    grid = min(-(-n_groups // DECODE_THREADS), MAX_GRID)
    for k, (codes, table, scale, (_, decode_name)) in enumerate(_stages(packed)):
        _module().get_function(decode_name)(
            (grid,), (DECODE_THREADS,), (codes, table, scale, w_hat, np.int64(n_groups), np.int32(k > 0)))
    return w_hat


def matmul(packed, x):
    """y [m, out] = x [m, in] @ W.T for a CuPy x."""
    import cupy

    n_out, n_in = packed.shape
    x_rot = hadamard_rows(cupy.asarray(x, dtype=cupy.float32), pre=packed.signs_in)  # [m, in]
    m = x_rot.shape[0]
    if m > FUSED_MAX_ROWS:
        y_rot = x_rot @ decoded(packed).T  # [m, out] (cuBLAS)
    else:
        if x_rot.data.ptr % 16:  # the kernels read x as float4
            x_rot = x_rot.copy()
        y_rot = cupy.empty((m, n_out), dtype=cupy.float32)  # [m, out]
        grid = (-(-n_out // WARPS_PER_BLOCK), m)
        for k, (codes, table, scale, (matmul_name, _)) in enumerate(_stages(packed)):
            vector = codes.shape[1] * codes.itemsize % 16 == 0 and codes.data.ptr % 16 == 0  # 16-byte code rows
            _module().get_function(matmul_name)(
                grid, (32, WARPS_PER_BLOCK),
                (codes, table, scale, x_rot, y_rot, np.int32(n_out), np.int32(n_in), np.int32(k > 0), np.int32(vector)))
    return hadamard_rows(y_rot, post=packed.signs_out, transpose=True)  # [m, out]
