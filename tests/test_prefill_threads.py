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


def test_a_task_that_runs_tasks_does_not_wait_for_itself():
    # a nested call from a worker runs its tasks on that worker: through the same kept pool (same count),
    # whose other workers are busy with the outer tasks, it would wait for itself
    outer = max(2, numba.get_num_threads())
    seen = np.zeros((outer, outer), dtype=np.int64)  # [outer, outer] how often each inner task ran

    def inner_tasks(i):
        def inner(j):
            seen[i, j] += 1
        prefill_threads.run_on_workers(inner, outer)

    done = threading.Event()
    runner = threading.Thread(target=lambda: (prefill_threads.run_on_workers(inner_tasks, outer), done.set()))
    runner.start()
    runner.join(timeout=30)
    assert done.is_set() and (seen == 1).all()


@pytest.mark.parametrize("n", [1, 2, 5, 32])
def test_run_split_covers_every_index_once_in_contiguous_ranges(n):
    seen, ranges, lock = np.zeros(n, dtype=np.int64), [], threading.Lock()

    def task(start, stop):
        with lock:
            ranges.append((start, stop))
        seen[start:stop] += 1

    prefill_threads.run_split(n, task)
    assert (seen == 1).all()
    assert len(ranges) == max(1, min(numba.get_num_threads(), n)) and all(a < b for a, b in ranges)


def test_split_prefill_steps_equal_the_whole_arrays(monkeypatch):
    # model.py's attention (kv heads over the workers) and SwiGLU (rows over the workers) give the same bits
    # as one pass over the whole arrays
    import types

    import model
    rng = np.random.default_rng(0)
    llama = object.__new__(model.Model)
    llama.xp, llama.config = np, types.SimpleNamespace(n_kv_heads=4)
    gate, up = (rng.standard_normal((7, 40)).astype(np.float32) for _ in range(2))  # [T, ffn]
    q = rng.standard_normal((8, 5, 16)).astype(np.float32)  # [H, T, hd]: 2 query heads per kv head
    keys, values = (rng.standard_normal((4, 9, 16)).astype(np.float32) for _ in range(2))  # [KV, S, hd]
    split = llama.swiglu(gate, up), llama.attend_prefill(q, keys, values, 4)
    monkeypatch.setattr(model, "run_split", lambda n, task: task(0, n))
    assert np.array_equal(split[0], gate * (0.5 + 0.5 * np.tanh(0.5 * gate)) * up)
    assert np.array_equal(split[1], llama.attend_prefill(q, keys, values, 4))
