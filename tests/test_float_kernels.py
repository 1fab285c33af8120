"""runtime/kernels/float_numba.py: float32 weights on every core, against NumPy's x @ w.T.

Tolerance: conftest's assert_close (1e-5 relative): the Numba matvec sums each row in vector lanes, BLAS in
its own order; the split prefill calls BLAS on parts of w's rows.
"""
import numba
import numpy as np
import pytest

from conftest import assert_close, inputs
from runtime.kernels import float_numba, prefill_threads
from runtime.linear import linear


@pytest.mark.parametrize("n_out, n_in", [(1, 1), (7, 33), (67, 200), (1536, 576), (131, 1000)])  # odd shapes,
def test_one_row_equals_numpy(n_out, n_in):  # serial and parallel (the last two are above PARALLEL_BYTES)
    w = inputs(1, n_out, n_in)
    x = inputs(2, n_in, mean=0.5)
    assert (w.nbytes >= float_numba.PARALLEL_BYTES) == (n_out > 1000 or n_in == 1000)
    assert_close(float_numba.matmul(x, w), w @ x)  # [out]
    assert_close(float_numba.matmul(x[None], w), x[None] @ w.T)  # [1, out]
    assert_close(float_numba._matvec_serial(w, x), w @ x)
    assert_close(float_numba._matvec_parallel(w, x, 3), w @ x)  # more tasks than cores: every row once


@pytest.mark.parametrize("rows, n_out, n_in", [(128, 1536, 576), (37, 301, 1000), (5, 3, 64)])
def test_many_rows_split_over_the_cores_equal_numpy(rows, n_out, n_in, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")  # as runtime/__init__.py sets it
    w = inputs(3, n_out, n_in)
    x = inputs(4, rows, n_in, mean=0.5)
    split = rows * w.size >= float_numba.SPLIT_MACS and numba.get_num_threads() > 1 and n_out > 1
    calls = []
    monkeypatch.setattr(prefill_threads, "run_on_workers", lambda task, count: (calls.append(count),
                                                                                [task(i) for i in range(count)]))
    assert_close(float_numba.matmul(x, w), x @ w.T)
    assert calls == ([min(numba.get_num_threads(), n_out)] if split else [])


def test_blas_with_its_own_threads_is_one_call(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")  # train.py / quantize.py: BLAS on every core already
    monkeypatch.setattr(prefill_threads, "run_on_workers", lambda task, count: pytest.fail("split"))
    w, x = inputs(5, 1536, 576), inputs(6, 128, 576)
    assert_close(float_numba.matmul(x, w), x @ w.T)


def test_linear_takes_only_float32_numpy_weights(monkeypatch):
    w, x = inputs(7, 40, 64), inputs(8, 3, 64)
    assert float_numba.takes(x, w) and float_numba.takes(x[0], w)
    assert not float_numba.takes(x, w.astype(np.float16))  # float16 weights: NumPy
    assert not float_numba.takes(x, np.asfortranarray(w))  # not C-contiguous
    assert not float_numba.takes(x[None], w)  # three axes
    assert not float_numba.takes(x.astype(np.float64), w)
    b = inputs(9, 40)
    assert_close(linear(x, w, b), x @ w.T + b)
    assert_close(linear(x[0], w), w @ x[0])
    half = linear(x, w.astype(np.float16))
    assert_close(half, x @ w.astype(np.float16).astype(np.float32).T)
