"""Float32 weights on every core of the CPU: the decode matvec (Numba) and the prefill matmul (BLAS by parts).

BLAS runs on one thread (runtime/__init__.py: its busy-waiting workers took
the cores from the Numba kernels), so a float32 weight multiplied by NumPy
alone used one core. Here:

- one row (decode): y[o] = sum_i w[o, i] x[i] in a parallel Numba loop, the
  output rows split into one contiguous range per task, each row a dot
  product that LLVM vectorizes (fastmath: sums in another order than
  BLAS). Measured on 2 cores, a 5632x2048 weight 1.8 ms with OpenBLAS's
  gemv against 0.7 ms; weights under PARALLEL_BYTES run on the calling
  thread, where waking the workers costs more than it saves;
- many rows (prefill): w's rows split into one contiguous part per core,
  each part multiplied by BLAS on its own thread (NumPy releases the GIL;
  runtime/kernels/prefill_threads.py): a 128x576 by 576x1536 product 2.6 ->
  1.4 ms. Each part is computed as w x.ᵀ and written transposed: OpenBLAS's
  sgemm (SkylakeX kernels on Zen 4) gave 157-166 GFLOP/s on two cores for
  x wᵀ and 169-178 for w xᵀ at TinyLlama's shapes with 128 rows. Products
  under SPLIT_MACS multiply-adds stay one BLAS call.

The reference is NumPy's x @ w.T (tests/test_float_kernels.py).
"""
from __future__ import annotations

import os

import numba
import numpy as np
from numba import njit, prange

from runtime.kernels.prefill_threads import run_on_ranges

PARALLEL_BYTES = 256 << 10  # weights below this decode on the calling thread
SPLIT_MACS = 1 << 23  # multiply-adds below which a prefill product stays one BLAS call


@njit(inline="always", fastmath=True)
def _rows(w, x, y, o0, o1):
    """y[o] = w[o] . x for the rows o0 .. o1-1."""
    for o in range(o0, o1):
        acc = np.float32(0)
        for i in range(w.shape[1]):
            acc += w[o, i] * x[i]
        y[o] = acc


@njit(cache=True, parallel=True, fastmath=True)
def _matvec_parallel(w, x, tasks):
    """y [out] = w [out, in] @ x [in], the rows split over `tasks` tasks."""
    y = np.empty(w.shape[0], dtype=np.float32)  # [out]
    for t in prange(tasks):
        _rows(w, x, y, t * w.shape[0] // tasks, (t + 1) * w.shape[0] // tasks)
    return y


@njit(cache=True, fastmath=True)
def _matvec_serial(w, x):
    """y [out] = w [out, in] @ x [in] on the calling thread."""
    y = np.empty(w.shape[0], dtype=np.float32)  # [out]
    _rows(w, x, y, 0, w.shape[0])
    return y


def takes(x, w) -> bool:
    """Whether these kernels multiply x [..., in] by w [out, in]: float32 NumPy arrays, x of one or two axes,
    w C-contiguous."""
    return (isinstance(w, np.ndarray) and isinstance(x, np.ndarray) and w.dtype == np.float32
            and x.dtype == np.float32 and x.ndim in (1, 2) and w.flags.c_contiguous)


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [..., in] @ w.T for float32 x (one or two axes) and C-contiguous float32 w [out, in] (`takes`), on
    every core: the Numba matvec for one row, BLAS by parts of w's rows for many (when BLAS runs on one
    thread; else one BLAS call, which has its own threads)."""
    threads = numba.get_num_threads()
    rows = 1 if x.ndim == 1 else x.shape[0]
    if rows == 1:
        v = np.ascontiguousarray(x.reshape(-1))  # [in]
        big = w.nbytes >= PARALLEL_BYTES and threads > 1
        y = _matvec_parallel(w, v, min(threads, w.shape[0])) if big else _matvec_serial(w, v)  # [out]
        return y if x.ndim == 1 else y.reshape(1, -1)
    parts = min(threads, w.shape[0])
    if parts == 1 or rows * w.size < SPLIT_MACS or os.environ.get("OPENBLAS_NUM_THREADS") != "1":
        return x @ w.T  # [m, out]
    y = np.empty((rows, w.shape[0]), dtype=np.float32)  # [m, out]

    def part(a, b):  # w's rows a .. b-1 as (w x.T).T: OpenBLAS's sgemm ran 7-12% faster that way round
        y[:, a:b] = (w[a:b] @ x.T).T  # [m, b - a]
    run_on_ranges(w.shape[0], parts, part)
    return y
