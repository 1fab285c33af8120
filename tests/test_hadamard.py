"""Tests of runtime/hadamard.py: the Sylvester and Paley constructions (QuIP# §3) and the fast transform."""
import numpy as np
import pytest

from conftest import assert_close, inputs
from runtime.errors import UserError
from runtime.hadamard import (fast_hadamard, hadamard_factor, hadamard_matrix, hadamard_on_columns,
                              random_signs, small_hadamard)

# every transform size of SmolLM2-135M and the OPT family (hidden, FFN, and OPT-350m's 512 / 1024)
MODEL_SIZES = (512, 576, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 7168, 8192, 9216, 10240,
               16384, 20480, 28672, 36864)
DENSE_LIMIT = 10240  # build the dense n×n matrix up to this size (bigger ones: the transform only)
FULL_PRODUCT_LIMIT = 3072  # check all of H Hᵀ up to this size; above it, the rows in ROW_SAMPLE
ROW_SAMPLE = 48


@pytest.mark.parametrize("k", [1, 12, 20, 28, 36, 44, 60, 52, 244, 344])  # 52, 244, 344: GF(5²), GF(11²), GF(7³)
def test_small_factors_are_hadamard(k):
    h = small_hadamard(k)
    assert set(np.unique(h)) <= {-1.0, 1.0}
    assert np.array_equal(h @ h.T, k * np.eye(k, dtype=np.float32))


def test_prime_fields_keep_their_matrices():
    """A prime q keeps the Jacobsthal matrix of the integers mod q (element i = i), and an order a prime builds
    keeps that construction where a prime power would build it too (28: Paley II of 13, not Paley I of 27), so
    every factor of the sizes built before prime-power fields is unchanged."""
    from runtime.hadamard import _jacobsthal, _paley_kind
    for q in (3, 7, 11, 13, 43, 103):
        residues = {i * i % q for i in range(1, q)}
        chi = np.array([0] + [1 if a in residues else -1 for a in range(1, q)])  # [q]
        idx = np.arange(q)
        assert np.array_equal(_jacobsthal(q), chi[(idx[None, :] - idx[:, None]) % q])
    assert _paley_kind(28) == "II" and _paley_kind(344) == "I" and _paley_kind(52) == "II"
    assert _paley_kind(126) is None  # 125 = 5³ ≡ 1 mod 4 (not I); 62 = 2 · 31 (no field)


def test_prime_power_fields_shrink_the_factor_of_llama_ffn_widths():
    """Llama-2-7B's FFN width 11008 = 43 · 256: K = 344 from GF(7³) (a dense 5504 factor without prime powers),
    and the transform stays orthonormal and its own inverse's transpose."""
    assert hadamard_factor(11008) == (344, 5)
    assert hadamard_factor(6656) == (52, 7)  # 13 · 512: GF(5²), not 104
    x = inputs(11008, 2, 11008)  # [2, 11008]
    y = fast_hadamard(x)
    assert np.allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    assert_close(fast_hadamard(y, transpose=True), x)


def test_factors_of_model_sizes():
    expected = {576: (36, 4), 768: (12, 6), 1536: (12, 7), 2560: (20, 7), 7168: (28, 8), 9216: (36, 8),
                36864: (36, 10), 4096: (1, 12), 512: (1, 9)}
    for n, kp in expected.items():
        assert hadamard_factor(n) == kp
    for n in MODEL_SIZES:
        k, p = hadamard_factor(n)
        assert k * 2 ** p == n


@pytest.mark.parametrize("n", [n for n in MODEL_SIZES if n <= DENSE_LIMIT] + [2, 12, 40, 56, 72, 688, 832])
def test_dense_matrix_orthogonal_and_fast_transform_matches(n):
    h = hadamard_matrix(n)  # [n, n]
    assert h.dtype == np.float32 and set(np.unique(h)) == {-1.0, 1.0}
    rows = np.arange(n)
    if n > FULL_PRODUCT_LIMIT:
        rows = np.random.default_rng(n).choice(n, ROW_SAMPLE, replace=False)
    # ±1 products summed in float32 are exact integers below 2**24
    assert np.array_equal(h[rows] @ h.T, n * np.eye(n, dtype=np.float32)[rows])
    x = inputs(n, 3, n)  # [3, n]
    scale = 1.0 / np.sqrt(n)
    for transpose, dense in ((False, (x @ h.T) * scale), (True, (x @ h) * scale)):
        fast = fast_hadamard(x, transpose=transpose)
        assert fast.shape == x.shape
        assert_close(fast, dense)


@pytest.mark.parametrize("n", [n for n in MODEL_SIZES if n > DENSE_LIMIT])
def test_large_sizes_orthonormal(n):
    x = inputs(n, 2, n)  # [2, n]
    y = fast_hadamard(x)
    assert np.allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    assert_close(fast_hadamard(y, transpose=True), x)


def test_transform_over_leading_axes_and_unnormalized():
    x = inputs(0, 2, 3, 768)  # [2, 3, 768]
    y = fast_hadamard(x, normalize=False)
    assert y.shape == x.shape
    assert np.allclose(y[1, 2], hadamard_matrix(768) @ x[1, 2], rtol=1e-5, atol=1e-3)
    # Paley factors are not symmetric, so H and Hᵀ differ for 768 = 12 * 64
    assert not np.allclose(fast_hadamard(x), fast_hadamard(x, transpose=True))


@pytest.mark.parametrize("n", [2, 8, 12, 40, 56, 72, 768, 2048, 2560])
def test_hadamard_on_columns_equals_the_dense_product_in_float64(n):
    h = hadamard_matrix(n).astype(np.float64) / np.sqrt(n)  # [n, n]
    c = np.random.default_rng(n).standard_normal((n, 3))  # [n, 3] float64
    for transpose, columns in ((False, h @ c), (True, h.T @ c)):
        z = hadamard_on_columns(c, transpose)
        assert z.dtype == np.float64 and z.shape == c.shape
        np.testing.assert_allclose(z, columns, rtol=0, atol=1e-13 * np.sqrt(n))
    assert hadamard_on_columns(c.astype(np.float32)).dtype == np.float32


def test_random_signs():
    s = random_signs(1000, seed=3)
    assert s.dtype == np.float32 and set(np.unique(s)) == {-1.0, 1.0}
    assert np.array_equal(s, random_signs(1000, seed=3))
    assert not np.array_equal(s, random_signs(1000, seed=4))
    assert abs(s.mean()) < 0.15


@pytest.mark.parametrize("n", [3, 6, 0, -8])
def test_unsupported_sizes_raise(n):
    with pytest.raises(UserError, match=str(n)):
        hadamard_factor(n)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 8, 96, 4096, 5632, 12288, 13824])  # 13824 > one block's shared memory: CuPy path
def test_cuda_hadamard_rows_match_numpy(cupy, n):
    from runtime.kernels.hadamard_cuda import hadamard_rows
    rng = np.random.default_rng(n)
    x = inputs(rng, 3, n)  # [3, n]
    pre, post = random_signs(n, 1), random_signs(n, 2)  # [n] each
    for transpose in (False, True):
        ref = fast_hadamard(x * pre, transpose=transpose) * post  # [3, n]
        y = hadamard_rows(cupy.asarray(x), cupy.asarray(pre), cupy.asarray(post), transpose).get()
        assert np.abs(y - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())
        plain = hadamard_rows(cupy.asarray(x), transpose=transpose).get()
        assert np.abs(plain - fast_hadamard(x, transpose=transpose)).max() < 1e-5 * max(1.0, np.abs(ref).max())
