"""runtime/kernels/prefill_threads.py: every tile once, one buffer per thread, errors reach the caller."""
import threading

import numba
import numpy as np
import pytest

from runtime.kernels import prefill_threads


@pytest.mark.parametrize("n, width", [(10, 3), (8, 8), (1, 4), (1000, 7)])
def test_every_tile_is_filled_and_multiplied_once(n, width):
    seen = np.zeros(n, dtype=np.int64)  # [n] how often each index was multiplied
    buffers = {}  # tile start -> id of the buffer it was filled in
    lock = threading.Lock()

    def fill(start, size, buffer):
        assert size == min(width, n - start) and buffer.shape == (width, 2)
        with lock:
            buffers[start] = id(buffer)
        buffer[:size, 0] = np.arange(start, start + size)

    def multiply(start, size, buffer):
        seen[buffer[:size, 0].astype(np.int64)] += 1

    prefill_threads.run_tiles(n, width, (width, 2), fill, multiply)
    assert (seen == 1).all()
    # tiles are dealt round-robin to the workers, each with its own buffer: a worker's tiles share one
    # (a pool thread may run two workers one after the other, so this is keyed by worker, not by thread)
    starts = list(range(0, n, width))
    workers = max(1, min(numba.get_num_threads(), len(starts)))
    for first in range(workers):
        assert len({buffers[s] for s in starts[first::workers]}) == 1


def test_a_worker_error_is_raised_to_the_caller():
    def fill(start, size, buffer):
        if start == 6:
            raise ValueError("tile 6")

    with pytest.raises(ValueError, match="tile 6"):
        prefill_threads.run_tiles(9, 3, (3,), fill, lambda *args: None)
