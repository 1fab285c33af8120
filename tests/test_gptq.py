"""GPTQ (gptq.py) against RTN, against the paper's unbatched update equations, and round trips of its format.

The reference for Algorithm 1 is a direct NumPy transcription of the Optimal
Brain Quantizer step of Frantar et al. 2022, eq. (2)-(3): quantize column q,
spread its error with the full inverse Hessian, remove q from the inverse by
one Gaussian elimination step. No Cholesky, no lazy batches, no blocks.
"""
import numpy as np
import pytest

from conftest import assert_shared_hessian_equals_separate_calls
import gptq
import rtn
from runtime.quant_grid import dequantize_grid, find_grid, quantize_to_grid
from runtime.errors import UserError


def problem(n_out=48, n_in=256, seed=0):
    """A random weight W [out, in], calibration inputs X [in, n] with correlated features and H = 2/n X Xᵀ."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_out, n_in)).astype(np.float32)  # [out, in]
    mix = np.eye(n_in) + 0.3 * rng.standard_normal((n_in, n_in))  # [in, in]
    X = mix @ rng.standard_normal((n_in, 2 * n_in)) * rng.uniform(0.2, 3.0, (n_in, 1))  # [in, n]
    return W, X, 2 / X.shape[1] * X @ X.T


def obq_reference(W, H, bits, group, sym, percdamp=0.01):
    """Algorithm 1 without its speed-ups: eq. (2)-(3) of the paper with the explicit inverse Hessian."""
    W = W.astype(np.float64).copy()  # [out, in]
    n_in = W.shape[1]
    H_inv = np.linalg.inv(H + percdamp * np.mean(np.diag(H)) * np.eye(n_in))  # [in, in]
    width = group or n_in
    Q = np.zeros_like(W)  # [out, in]
    for q in range(n_in):
        if q % width == 0:
            scale, zero = find_grid(W[:, q:q + width], bits, sym)
        Q[:, q] = dequantize_grid(quantize_to_grid(W[:, q].astype(np.float32), scale, zero, bits), scale, zero)
        err = (W[:, q] - Q[:, q]) / H_inv[q, q]  # [out]
        W -= np.outer(err, H_inv[:, q])  # eq. (3): δ = -(w_q - quant(w_q)) / [H⁻¹]_qq · (H⁻¹):,q
        H_inv -= np.outer(H_inv[:, q], H_inv[q, :]) / H_inv[q, q]  # eq. (2): remove q from H⁻¹
    return Q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [0, 32, 64, 128])
@pytest.mark.parametrize("sym", [False, True])
def test_proxy_loss_below_rtn(bits, group, sym):
    W, X, H = problem()
    for act_order in (False, True):
        packed, stats = gptq.quantize(W, H, gptq.GPTQParams(bits, group, sym, act_order))
        # the loss as the layer's output error on the calibration inputs: 2/n ‖(W - Q) X‖²
        for Q, key in ((packed.dequantize(), "loss"),
                       (rtn.quantize(W, rtn.RTNParams(bits, group, sym=sym)).dequantize(), "rtn_loss")):
            output_error = 2 / X.shape[1] * np.sum(((W - Q).astype(np.float64) @ X) ** 2)
            assert stats[key] == pytest.approx(output_error, rel=1e-5)  # layerwise.proxy_loss: float32 product
        assert stats["loss"] < stats["rtn_loss"]
        assert stats["ratio"] == pytest.approx(stats["loss"] / stats["rtn_loss"])


@pytest.mark.parametrize("n_in", [64, 129, 700])
def test_inverse_hessian_factor_is_the_cholesky_factor_of_the_inverse(n_in):
    # as the reference computes it, cholesky(inverse(H)).T, here from one blocked factorisation of H and a
    # blocked triangular inverse (one block, one plus a remainder, several blocks and a remainder)
    import layerwise
    _, _, H = problem(n_in=n_in, seed=n_in)
    H = layerwise.damp(H, 0.01)  # [in, in]
    U = layerwise.inverse_hessian_factor(H)  # [in, in]
    reference = np.linalg.cholesky(np.linalg.inv(H)).T  # [in, in] upper
    assert U.dtype == np.float64 and np.array_equal(U, np.triu(U))
    np.testing.assert_allclose(U, reference, rtol=0, atol=1e-9 * np.abs(reference).max())
    # GPTQ's float32 factorisation (its reference's precision) stays within float32 rounding of it
    U32 = layerwise.inverse_hessian_factor(H.astype(np.float32))  # [in, in]
    assert U32.dtype == np.float32 and np.array_equal(U32, np.triu(U32))
    np.testing.assert_allclose(U32, reference, rtol=0, atol=1e-4 * np.abs(reference).max())


@pytest.mark.parametrize("n", [5, 256, 700])
def test_blocked_cholesky_and_triangular_inverse_equal_numpy(n):
    import layerwise
    rng = np.random.default_rng(n)
    X = rng.standard_normal((n + 8, n))  # [m, n]
    H = X.T @ X + 0.1 * np.eye(n)  # [n, n] positive definite
    L = layerwise.cholesky_lower(H)  # [n, n]
    np.testing.assert_allclose(L, np.linalg.cholesky(H), rtol=0, atol=1e-10 * np.abs(L).max())
    assert np.array_equal(L, np.tril(L))
    inverse = layerwise.lower_triangular_inverse(L)  # [n, n]
    np.testing.assert_allclose(inverse, np.linalg.inv(L), rtol=0, atol=1e-9 * np.abs(inverse).max())
    assert np.array_equal(inverse, np.tril(inverse))
    # overwrite: the same values in the caller's array, no copy
    work = H.copy()
    assert layerwise.cholesky_lower(work, overwrite=True) is work and np.array_equal(work, L)
    assert layerwise.lower_triangular_inverse(work, overwrite=True) is work and np.array_equal(work, inverse)
    H[n - 1, n - 1] = -1.0  # not positive definite
    with pytest.raises(UserError, match="not positive definite"):
        layerwise.cholesky_lower(H)


@pytest.mark.parametrize("bits,group,sym", [(4, 0, False), (3, 32, True), (2, 64, False), (8, 128, False)])
def test_matches_unbatched_paper_equations(bits, group, sym):
    W, _, H = problem(n_out=16, n_in=320, seed=1)  # 320 columns: blocks of 128 and a short last group
    result = gptq.quantize_columns(W, H, gptq.GPTQParams(bits, group, sym, blocksize=128))
    reference = obq_reference(W, H, bits, group, sym)
    differ = ~np.isclose(result.Q, reference, rtol=0, atol=1e-5)  # a rounding tie may flip, rarely
    assert differ.mean() < 0.002


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [0, 32, 128])
@pytest.mark.parametrize("sym", [False, True])
def test_identity_hessian_gives_rtn(bits, group, sym):
    W, _, _ = problem(n_in=256)
    packed, _ = gptq.quantize(W, np.eye(256), gptq.GPTQParams(bits, group, sym))
    expected = rtn.quantize(W, rtn.RTNParams(bits, group, sym=sym))
    for name, array in expected.tensors().items():
        np.testing.assert_array_equal(packed.tensors()[name], array, err_msg=name)


@pytest.mark.parametrize("group", [0, 32, 64])
def test_act_order_permutation_round_trips(group):
    W, X, H = problem(n_in=192)  # 192 = 6 groups of 32, 3 groups of 64
    params = gptq.GPTQParams(4, group, False, act_order=True)
    result = gptq.quantize_columns(W, H, params)
    packed, _ = gptq.quantize(W, H, params)
    perm = np.argsort(-np.diag(H), kind="stable")  # quantization order: descending H_jj
    if group:
        assert packed.act_order
        np.testing.assert_array_equal(packed.g_idx[perm], np.arange(192) // group)
    np.testing.assert_array_equal(packed.dequantize(), result.Q)  # original column order
    x = X[:, :5].T.astype(np.float32)  # [5, in]
    np.testing.assert_allclose(packed.matmul_reference(x), x @ result.Q.T, rtol=1e-5, atol=1e-4)


def test_static_groups_use_grids_of_the_original_weights():
    W, _, H = problem(n_in=128)
    result = gptq.quantize_columns(W, H, gptq.GPTQParams(3, 32, False, act_order=True, static_groups=True))
    np.testing.assert_array_equal(result.g_idx, np.arange(128) // 32)
    for g in range(4):
        scale, zero = find_grid(W[:, 32 * g:32 * (g + 1)], 3, False)
        np.testing.assert_array_equal(result.scales[g], scale)
        np.testing.assert_array_equal(result.zeros[g], zero)


def test_dead_columns_are_zeroed():
    W, _, H = problem(n_in=64)
    H[5, :] = H[:, 5] = 0  # no input ever reaches column 5
    packed, stats = gptq.quantize(W, H, gptq.GPTQParams(4, 32, False))
    Q = packed.dequantize()
    assert np.all(Q[:, 5] == 0) and np.isfinite(Q).all() and stats["loss"] < stats["rtn_loss"]
    # the loss from the algorithm's errors (gptq.obs_columns, layerwise.undamped_losses) equals
    # tr((W − Q) H (W − Q)ᵀ) with the dead column
    D = (W - Q).astype(np.float64)  # [out, in]
    assert stats["loss"] == pytest.approx(np.einsum("oi,ij,oj->", D, H, D), rel=1e-5)


def test_shared_hessian_equals_separate_calls():
    W, _, H = problem(n_out=40)
    assert_shared_hessian_equals_separate_calls(gptq, W, H, gptq.GPTQParams(4, 64, False, act_order=True), 24)


