"""Prefill products by tiles on several threads: dequantize a tile of the weight, multiply it by BLAS.

The prefill path of the packed formats (many input rows) decodes the weight
tile by tile into a float32 buffer and lets BLAS multiply; BLAS runs on one
thread (runtime/__init__.py: its busy-waiting pool took the cores from the
Numba kernels). Here the tiles are dealt round-robin to one Python thread per
core, each with its own buffer: the dequantizing kernel (Numba, compiled
`nogil`) and the BLAS call (NumPy releases the GIL) of one thread run beside
those of the others, so every core multiplies. Measured on 2 cores: a
TinyLlama-shaped rtn4g128 prefill of 128 tokens at 31-36 tok/s with one
dequantizing region and BLAS on one thread per tile.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np


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

    if threads == 1:
        worker(0)
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))  # list(): re-raises a worker's exception here
