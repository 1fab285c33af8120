"""The runtime: the machinery below model.py, the method files and pipeline/, importing none of them. Its
folders follow the data flow: hub/ (where a model comes from), checkpoints/ (model files in and out), text/
(tokenizer, data sets), formats/ and kernels/ (packed tensors and their products), generation/ (the decode
loop, sampling); shared math and the error type sit beside them.

Importing it first sets one thread default (a value already set wins): BLAS
runs on one thread (`OPENBLAS_NUM_THREADS=1`), because its workers busy-wait
after every BLAS call and, alternating with Numba's parallel kernels (as every
packed matmul does), took the cores from them: 5-15x slower prefill on a
2-core machine. Numba's kernels use every core, and its OpenMP workers keep
the OpenMP default (spin briefly after a parallel region, then sleep), so the
hundreds of small parallel products of a decode step do not wake sleeping
threads each time: measured on 2 cores, SmolLM2 rtn4g128 decodes 66-81 tok/s
with all products parallel under the default, 50-70 with `OMP_WAIT_POLICY=PASSIVE`
(which this module used to set). BLAS reads the variable when NumPy loads, hence
here; an application that imported NumPy first (an embedding app, a notebook)
gets the same limit through threadpoolctl, which sets the loaded BLAS's
threads: measured on 2 cores, TinyLlama-1.1B QuIP# prefill 46 tok/s with
NumPy imported first and BLAS on both cores, 103 with one.

The entry points whose work is large matrix products and no packed kernels
(quantize.py's calibration passes and Hessian math, train.py's products with
dequantized layers) call `blas_on_every_core()` first instead: measured on
2 cores, SmolLM2 QLoRA training 60 -> 76 tok/s.

Importing it also keeps freed memory for reuse (`keep_freed_memory`, unless
the user tuned glibc's malloc through MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES): a prefill or a training pass makes
thousands of temporaries of a few megabytes (a [512, 1536] float32 array is
3 MB), and glibc's malloc by default hands the heap's top back to the kernel
when they are freed, so each is page-faulted in again, zeroed page by page.
Measured on 2 cores: the SwiGLU backward's NumPy expression 4.8 ms on
[512, 1536] arrays that way and 1.0 ms with freed blocks reused; SmolLM2
NF4-DQ training 123 -> 149 tok/s (medians of 4 interleaved runs); SmolLM2
prefill of 128 tokens, three interleaved runs each, quip2 222-258 -> 304-422
tok/s and rtn4g128 310-419 -> 439-584. The process keeps its high-water heap
(its peak RSS is unchanged).
"""
import ctypes
import os
import sys

_USER_BLAS_THREADS = "OPENBLAS_NUM_THREADS" in os.environ  # the user's value wins over both defaults
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
USER_MALLOC = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # the user's malloc tuning wins over ours


def _blas_threads(threads: int) -> None:
    """BLAS on `threads` threads unless the user set OPENBLAS_NUM_THREADS: the variable for a NumPy not yet
    loaded, threadpoolctl for one already loaded."""
    if _USER_BLAS_THREADS:
        return
    os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    if "numpy" in sys.modules:
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads, user_api="blas")


def blas_on_every_core() -> None:
    """BLAS on one thread per core unless the user set OPENBLAS_NUM_THREADS."""
    _blas_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def keep_freed_memory() -> None:
    """glibc malloc: blocks up to 32 MB come from the heap (not their own mapping), and the heap is never
    handed back to the kernel on a free (trim threshold 2 GB), so freed temporaries are reused without page
    faults; the process keeps its high-water heap. No-op where the user tuned malloc (module docstring) or the
    system is not Linux (macOS's C library has no `mallopt`)."""
    tuned = any(name in os.environ for name in USER_MALLOC) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    if tuned or not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest allowed value on 64-bit
        mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)


_blas_threads(1)
keep_freed_memory()
