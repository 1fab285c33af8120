"""The sparse format (runtime/formats/sparse.py, SpQR's outliers in CSR): its Numba kernel against the
NumPy reference, and the refusal of bad entries. Its CUDA kernel is checked with SpQR's outliers in
test_spqr_format.py.
"""
import numpy as np
import pytest

from conftest import assert_close, inputs
from runtime.errors import UserError
from runtime.formats.sparse import SparseTensor


def random_outliers(rng, n_out, n_in, fraction):
    """A SparseTensor holding about `fraction` of an [n_out, n_in] matrix, at random positions."""
    mask = rng.random((n_out, n_in)) < fraction  # [out, in]
    rows, cols = np.nonzero(mask)
    return SparseTensor.from_entries(rows, cols, rng.standard_normal(rows.size) * 0.5, (n_out, n_in))


def test_sparse_kernel_matches_reference():
    rng = np.random.default_rng(40)
    sparse = random_outliers(rng, 300, 130, 0.03)
    dense = sparse.dequantize()  # [300, 130]
    assert np.count_nonzero(dense) == sparse.nnz > 0
    for rows in (1, 7):
        x = inputs(41, rows, 130, mean=0.5)
        assert_close(sparse.matmul(x), x @ dense.T, tol=1e-6)
    np.testing.assert_array_equal(sparse.row_ptr, np.concatenate([[0], np.cumsum(np.count_nonzero(dense, axis=1))]))


@pytest.mark.parametrize("rows, n_out", [(37, 300), (16, 64), (48, 40), (20, 5)])
def test_many_rows_add_into_views(rows, n_out):
    # prefill's path: x transposed and the sums added by 16 x 16 register transposes where rows and outputs
    # fill whole blocks, element by element at the edges; x and y views of larger arrays (as matmul passes
    # them: y is the product's padded output), nothing outside y written; y with steps along its rows too
    from runtime.kernels import sparse_numba
    rng = np.random.default_rng(rows + n_out)
    sparse = random_outliers(rng, n_out, 130, 0.05)
    dense = sparse.dequantize().astype(np.float64)  # [out, 130]
    wide = inputs(44, rows, 150, mean=0.5)  # [rows, 150]
    x = wide[:, 7:137]  # [rows, 130] a view with a row step of 150
    assert np.array_equal(sparse_numba._transposed(np.ascontiguousarray(x)), x.T)
    values = sparse.values.astype(np.float32)
    for transposed in (False, True):
        big = rng.standard_normal((n_out + 5, rows + 3) if transposed else (rows + 3, n_out + 5)).astype(np.float32)
        before = big.copy()
        y = big[:n_out, :rows].T if transposed else big[:rows, :n_out]  # [rows, out]
        expected = y.astype(np.float64) + x.astype(np.float64) @ dense.T  # [rows, out]
        sparse_numba.add_product(sparse.row_ptr, sparse.col_idx, values, x, y)
        assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()
        outside = np.ones(big.shape, dtype=bool)
        outside[(slice(n_out), slice(rows)) if transposed else (slice(rows), slice(n_out))] = False
        assert np.array_equal(big[outside], before[outside])


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_rows_split_over_threads_match_reference(threads, monkeypatch):
    # past PARALLEL_ENTRIES the few-row product splits the output rows over the threads by entries: rows
    # with no entries and rows with many included, every split point must be covered exactly once
    import numba
    from runtime.kernels import sparse_numba
    rng = np.random.default_rng(42)
    sparse = random_outliers(rng, 2000, 300, 0.05)
    monkeypatch.setattr(sparse_numba, "PARALLEL_ENTRIES", 1000)
    assert sparse.nnz > sparse_numba.PARALLEL_ENTRIES
    dense = sparse.dequantize()  # [2000, 300]
    dense[:50] = 0  # rows without entries at the start, and a heavy row
    dense[700, :] = 1
    sparse = SparseTensor.from_entries(*np.nonzero(dense), dense[np.nonzero(dense)], dense.shape)
    numba.set_num_threads(threads)
    try:
        for rows in (1, 4):
            x = inputs(43, rows, 300, mean=0.5)
            assert_close(sparse.matmul(x), x @ dense.T, tol=1e-6)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_sparse_rejects_bad_entries():
    with pytest.raises(UserError, match="same position"):
        SparseTensor.from_entries([1, 1], [2, 2], [1.0, 2.0], (4, 4))
    with pytest.raises(UserError, match="outside"):
        SparseTensor.from_entries([4], [0], [1.0], (4, 4))
    with pytest.raises(UserError, match="row_ptr"):
        SparseTensor(np.zeros(2, np.float16), np.zeros(2, np.uint16), np.array([0, 1], np.int32), in_features=4)
