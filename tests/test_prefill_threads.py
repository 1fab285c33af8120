"""runtime/kernels/prefill_threads.py: every tile once, one buffer per thread, errors reach the caller."""
import threading

import numpy as np
import pytest

from runtime.kernels import prefill_threads


@pytest.mark.parametrize("n, width", [(10, 3), (8, 8), (1, 4), (1000, 7)])
def test_every_tile_is_filled_and_multiplied_once(n, width):
    seen = np.zeros(n, dtype=np.int64)  # [n] how often each index was multiplied
    buffers = {}
    lock = threading.Lock()

    def fill(start, size, buffer):
        assert size == min(width, n - start) and buffer.shape == (width, 2)
        with lock:
            buffers.setdefault(threading.get_ident(), id(buffer))
            assert buffers[threading.get_ident()] == id(buffer)  # a thread keeps its buffer
        buffer[:size, 0] = np.arange(start, start + size)

    def multiply(start, size, buffer):
        seen[buffer[:size, 0].astype(np.int64)] += 1

    prefill_threads.run_tiles(n, width, (width, 2), fill, multiply)
    assert (seen == 1).all()


def test_a_worker_error_is_raised_to_the_caller():
    def fill(start, size, buffer):
        if start == 6:
            raise ValueError("tile 6")

    with pytest.raises(ValueError, match="tile 6"):
        prefill_threads.run_tiles(9, 3, (3,), fill, lambda *args: None)
