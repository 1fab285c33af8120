"""Prefill products by tiles on several threads: dequantize a tile of the weight, multiply it by BLAS.

The prefill path of the packed formats (many input rows) decodes the weight
tile by tile into a float32 buffer and lets BLAS multiply; BLAS runs on one
thread (runtime/__init__.py: its busy-waiting pool took the cores from the
Numba kernels). Here the tiles are dealt round-robin to one Python thread per
core, each with its own buffer: the dequantizing kernel (Numba, compiled
`nogil`) and the BLAS call (NumPy releases the GIL) of one thread run beside
those of the others, so every core multiplies. Measured on 2 cores: a
TinyLlama-shaped rtn4g128 prefill of 128 tokens at 31-36 tok/s with one
dequantizing region and BLAS on one thread per tile. The worker threads are
kept for the process (`worker_pool`); float32 weights split their rows over
them the same way (runtime/kernels/float_numba.py).
"""
from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

WORKER_PREFIX = "prefill-worker"  # the names of the kept pool's threads


@functools.cache
def worker_pool(threads: int) -> ThreadPoolExecutor:
    """One pool of `threads` worker threads, kept for the process: starting a pool costs about 0.2 ms against
    0.05 ms for handing work to a kept one, paid by every product of a prefill (211 for SmolLM2)."""
    return ThreadPoolExecutor(threads, thread_name_prefix=WORKER_PREFIX)


def run_on_workers(task, count: int) -> None:
    """task(i) for i < count, each on a worker of the kept pool (count > 1) or on the calling thread; a
    worker's exception is raised here. Called from a worker itself (a task that multiplies), the tasks run
    on that worker: waiting on the pool from inside it could wait for itself."""
    if count == 1 or threading.current_thread().name.startswith(WORKER_PREFIX):
        for i in range(count):
            task(i)
        return
    list(worker_pool(count).map(task, range(count)))  # list(): re-raises a worker's exception here


def run_on_ranges(n: int, parts: int, task) -> None:
    """task(start, stop) for `parts` contiguous ranges that split range(n) evenly, one per worker
    (`run_on_workers`)."""
    bounds = [p * n // parts for p in range(parts + 1)]
    run_on_workers(lambda p: task(bounds[p], bounds[p + 1]), parts)


def run_tiles(n: int, width: int, buffer_shape: tuple, fill, multiply) -> None:
    """For each tile start s = 0, width, 2 width, ... < n (size c = min(width, n - s)): fill(s, c, buffer)
    then multiply(s, c, buffer), with the tiles spread over numba.get_num_threads() threads, each with its
    own float32 buffer of buffer_shape. Both callables must write disjoint outputs per tile."""
    starts = list(range(0, n, width))
    threads = max(1, min(numba.get_num_threads(), len(starts)))

    def worker(first: int) -> None:
        buffer = np.empty(buffer_shape, dtype=np.float32)
        for start in starts[first::threads]:
            size = min(width, n - start)
            fill(start, size, buffer)
            multiply(start, size, buffer)

    run_on_workers(worker, threads)


def run_split(n: int, task) -> None:
    """task(start, stop) over range(n) in one contiguous range per core (`run_on_ranges`): NumPy work of a
    prefill (attention per head, elementwise steps per row) that would otherwise run on one core."""
    run_on_ranges(n, max(1, min(numba.get_num_threads(), n)), task)
