"""CuPy launchers of the uniform CUDA kernels (source: uniform.cu; layout: runtime/formats/uniform.py).

CuPy is imported on first use, so this module imports on machines without a
GPU. Up to MAX_FUSED_ROWS input rows (decode, small batches) run the fused
dequantize-matvec kernel, which reads the weights once for up to 8 rows (its
ROWS variants; 16 rows are two launches); more rows (prefill) dequantize W
into a temporary float32 array in storage order and let cuBLAS multiply. The packed arrays must already be CuPy arrays
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
KERNEL_ROWS = (1, 2, 4, 8)  # the matvec kernel's ROWS variants (uniform.cu)
MAX_FUSED_ROWS = 16  # more input rows: dequantize + cuBLAS
STAGED_BYTES = 40 * 1024  # shared memory for the staged slice of x and its run sums (48 KiB with the rest)
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
    """x [m, in] -> [m, n_runs * 32] float32 for the dequantize + cuBLAS product: gathered into storage order,
    zero padded to whole runs (x itself when it is in that order already)."""
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

    x = cupy.ascontiguousarray(x, dtype=cupy.float32)  # [m, in]
    m = x.shape[0]
    if m > MAX_FUSED_ROWS:
        return _storage_input(packed, x) @ dequantize_storage(packed)  # [m, out] (cuBLAS)
    y = cupy.zeros((m, packed.out_features), dtype=cupy.float32)  # [m, out]
    for r0 in range(0, m, KERNEL_ROWS[-1]):
        _matvec(packed, x[r0:r0 + KERNEL_ROWS[-1]], y[r0:r0 + KERNEL_ROWS[-1]])
    return y


def _matvec(packed, x, y) -> None:
    """y [m, out] += x [m, in] @ W.T for m <= 8 rows: one launch of the matvec kernel (which gathers x into
    storage order itself)."""
    qweight, qzeros, scales, n_runs, n_out, zero_words, group_runs = _kernel_args(packed)
    m = x.shape[0]
    rows = next(r for r in KERNEL_ROWS if r >= m)
    vec = 4 if int(n_out) % 4 == 0 and qweight.data.ptr % 16 == 0 else 1  # 16-byte loads of four columns
    columns = -(-int(n_out) // (32 * vec))
    max_slice = STAGED_BYTES // (4 * rows * (RUN + 1))  # runs of x staged per block
    slices = max(-(-int(n_runs) // max_slice), min(-(-int(n_runs) // RUN_SPLIT), max(1, MIN_BLOCKS // columns)))
    slice_runs = -(-int(n_runs) // slices)
    slices = -(-int(n_runs) // slice_runs)
    _module().get_function(f"uniform_matvec_{packed.bits}_r{rows}_v{vec}")(
        (columns, slices), (32, RUN_SPLIT),
        (qweight, qzeros, scales, x, x if packed.perm is None else packed.perm, y, np.int32(m),
         np.int32(packed.in_features), np.int32(packed.perm is not None), n_runs, n_out, zero_words, group_runs,
         np.int32(slice_runs)),
        shared_mem=4 * rows * slice_runs * (RUN + 1))
