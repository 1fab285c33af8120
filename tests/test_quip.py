"""QuIP (quip.py): LDLQ against GPTQ, the block LDL factorisation, incoherence processing and proxy losses.

The synthetic problem (`outlier_problem`) has a weight with planted outlier
rows and columns and a Hessian of correlated Gaussian inputs with features of
very different scales: the case incoherence processing is for.
"""
import numpy as np
import pytest

from conftest import assert_shared_hessian_equals_separate_calls
import gptq
import layerwise
import quip
from runtime.errors import UserError
from runtime.quant_grid import dequantize_grid, find_grid, quantize_to_grid


def outlier_problem(n_out=96, n_in=256, seed=0):
    """W [out, in] Gaussian with 3 outlier rows and 3 outlier columns (x8), inputs X [in, n], H = 2/n X Xᵀ."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_out, n_in)).astype(np.float32)  # [out, in]
    W[rng.choice(n_out, 3, replace=False)] *= 8
    W[:, rng.choice(n_in, 3, replace=False)] *= 8
    mix = np.eye(n_in) + 0.3 * rng.standard_normal((n_in, n_in))  # [in, in]
    X = mix @ rng.standard_normal((n_in, 2 * n_in)) * rng.uniform(0.2, 3.0, (n_in, 1))  # [in, n]
    return W, X, 2 / X.shape[1] * X @ X.T


def coherence(W):
    """max |W| / RMS(W): how far the largest weight sticks out."""
    W = np.asarray(W, dtype=np.float64)
    return float(np.abs(W).max() / np.sqrt(np.mean(W ** 2)))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ldlq_equals_gptq(bits):
    # §3: LDLQ is GPTQ (OPTQ). Same per-row grid (fitted on W, as GPTQ fits its per-row grid at column 0),
    # same dampening, 320 columns (two lazy batches and a short one): the codes are identical.
    W, _, H = outlier_problem(n_out=40, n_in=320, seed=bits)
    result = gptq.quantize_columns(W, H, gptq.GPTQParams(bits, -1, False, percdamp=0.01))
    scale, zero = find_grid(W, bits, False)

    def per_row_grid(target):
        codes = quantize_to_grid(target.astype(np.float32), scale, zero, bits)  # [out, 1]
        return dequantize_grid(codes, scale, zero), codes

    damped = H + 0.01 * np.mean(np.diag(H)) * np.eye(320)
    values, codes, losses = layerwise.ldlq(W, damped, per_row_grid)
    np.testing.assert_array_equal(codes, result.codes)
    np.testing.assert_array_equal(values.astype(np.float32), result.Q)
    D = W - values  # [out, in] float64
    # tr(D H Dᵀ) per row; the errors are fed back in float32 (as GPTQ's), so the identity holds to float32's 1e-7
    np.testing.assert_allclose(losses, np.einsum("oi,ij,oj->o", D, damped, D), rtol=1e-6)


@pytest.mark.parametrize("block", [1, 8])
def test_block_ldl_factorises_the_hessian(block):
    _, _, H = outlier_problem(n_in=64)
    feedback, diagonal = layerwise.block_ldl(H, block)  # Ů, B
    unit = feedback + np.eye(64)  # Ů + I
    D = np.linalg.solve(unit, np.linalg.solve(unit, H).T)  # (Ů + I)⁻¹ H (Ů + I)⁻ᵀ
    blocks = np.arange(64) // block
    off_block = blocks[:, None] != blocks[None, :]
    assert np.abs(D[off_block]).max() < 1e-9 * np.abs(D).max()  # D block diagonal
    for k, B in enumerate(diagonal):  # D_k = B_k B_kᵀ
        np.testing.assert_allclose(B @ B.T, D[k * block:(k + 1) * block, k * block:(k + 1) * block],
                                   rtol=0, atol=1e-9 * np.abs(D).max())
    assert np.all(feedback[blocks[:, None] >= blocks[None, :]] == 0)  # Ů block strictly upper
    np.testing.assert_allclose(unit @ D @ unit.T, H, rtol=0, atol=1e-9 * np.abs(H).max())


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n_out", [40, 600])
def test_ldlq_kernel_equals_the_numpy_loop(bits, n_out):
    # a ScalarGrid runs each lazy batch in runtime/kernels/ldlq_numba.py (600 rows: split over two threads);
    # any other callable (here the same grid behind a lambda) the NumPy loop: same codes and values, losses up
    # to the order and precision of the within-batch sums (float32 products in the loop, float64 in the kernel)
    W, _, H = outlier_problem(n_out=n_out, n_in=320, seed=bits)  # two lazy batches and a short one
    grid = quip.midrise_quantizer(2.0 / (1 << bits), bits)
    values, codes, losses = layerwise.ldlq(W, H, grid)
    loop_values, loop_codes, loop_losses = layerwise.ldlq(W, H, lambda target: grid(target))
    np.testing.assert_array_equal(codes, loop_codes)
    np.testing.assert_array_equal(values, loop_values)
    np.testing.assert_allclose(losses, loop_losses, rtol=1e-6)
    assert len(np.unique(codes)) == 1 << bits  # every level is used, both ends of the grid (the clip) too


def test_ldlq_with_identity_hessian_is_rounding():
    W, _, _ = outlier_problem(n_in=64)
    step = 0.5
    values, codes, _ = layerwise.ldlq(W, np.eye(64), quip.midrise_quantizer(step, 2))
    expected = np.clip(np.rint(W / step + 1.5), 0, 3)
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(values, (expected - 1.5) * step)


@pytest.mark.parametrize("rescale", [False, True])
def test_incoherence_processing_spreads_outliers(rescale):
    W, _, H = outlier_problem()
    processed = quip.preprocess(W, H, quip.QuIPParams(rescale=rescale))
    assert coherence(W) > 30  # the planted outliers: 8x the rest, 64x where an outlier row meets a column
    assert coherence(processed.W) < coherence(W) / 4  # spread over all weights: max ≈ 6 RMS here


def test_processing_is_undone_exactly_without_rounding():
    # Algorithm 2 inverts Algorithm 1: Uᵀ (U W D Vᵀ) V D⁻¹ = W, and the proxy loss is invariant:
    # tr(E H Eᵀ) = tr(E' H' E'ᵀ) for E' = U E D Vᵀ, H' = V D⁻¹ H D⁻¹ Vᵀ.
    W, _, H = outlier_problem(n_out=48, n_in=96)
    params = quip.QuIPParams(percdamp=0.0)
    processed = quip.preprocess(W, H, params)
    out_t, in_t = quip.transforms(W.shape, params.seed)
    back = out_t.apply(in_t.apply(processed.W, transpose=True).T, transpose=True).T / processed.rescale.astype(
        np.float64)
    np.testing.assert_allclose(back, W, rtol=0, atol=1e-4 * np.abs(W).max())
    E = np.random.default_rng(1).standard_normal(W.shape)  # [out, in] an error in the original space
    E_processed = out_t.apply(in_t.apply(E * processed.rescale.astype(np.float64)).T).T
    loss = lambda D, H: np.einsum("oi,ij,oj->", D, H, D)  # tr(D H Dᵀ) in float64
    assert loss(E_processed, processed.H) == pytest.approx(loss(E, H), rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_proxy_loss_below_gptq_and_rtn(bits):
    W, X, H = outlier_problem()
    packed, stats = quip.quantize(W, H, quip.QuIPParams(bits))
    Q = packed.dequantize()
    output_error = 2 / X.shape[1] * np.sum(((W - Q).astype(np.float64) @ X) ** 2)  # loss in the original space
    assert stats["loss"] == pytest.approx(output_error, rel=1e-6)
    _, gptq_stats = gptq.quantize(W, H, gptq.GPTQParams(bits, -1))  # GPTQ, per-row grid
    assert stats["rtn_loss"] == pytest.approx(gptq_stats["rtn_loss"])
    assert stats["loss"] < gptq_stats["loss"] < stats["rtn_loss"]
    assert stats["ratio"] == pytest.approx(stats["loss"] / stats["rtn_loss"])


@pytest.mark.parametrize("method", ["quip", "quipsharp"])
def test_loss_from_ldlq_equals_the_product_with_a_dead_column(method):
    # QuIP and QuIP# report LDLQ's own loss (layerwise.ldlq, undamped_losses), not a product by H: it must
    # equal tr((W − Q) H (W − Q)ᵀ) of the stored weight, also where an input never fires (its H row is zero)
    import quipsharp
    W, X, _ = outlier_problem()
    X[5] = 0
    H = 2 / X.shape[1] * X @ X.T  # [in, in] with a dead column 5
    module, params = (quip, quip.QuIPParams(2)) if method == "quip" else (quipsharp, quipsharp.QuIPSharpParams(2))
    packed, stats = module.quantize(W, H, params)
    D = (W - packed.dequantize()).astype(np.float64)  # [out, in]
    assert np.abs(D[:, 5]).max() > 0  # the transforms spread the other columns into the dead one
    assert stats["loss"] == pytest.approx(np.einsum("oi,ij,oj->", D, H, D), rel=1e-5)


def test_more_bits_lower_loss():
    W, _, H = outlier_problem()
    losses = [quip.quantize(W, H, quip.QuIPParams(bits))[1]["loss"] for bits in (2, 3, 4)]
    assert losses[0] > losses[1] > losses[2]


def test_stored_grid_is_the_papers():
    # Algorithm 1 steps 6-7: 2^b levels s (2q / (2^b − 1) − 1), s = 2.4 RMS of the processed weight
    W, _, H = outlier_problem(n_out=32, n_in=64)
    params = quip.QuIPParams(bits=2)
    packed, _ = quip.quantize(W, H, params)
    processed = quip.preprocess(W, H, params)
    s = 2.4 * np.sqrt(np.mean(processed.W ** 2))
    levels = np.unique(packed.processed())
    assert len(levels) == 4
    np.testing.assert_allclose(levels, s * np.array([-1, -1 / 3, 1 / 3, 1]), rtol=2e-3)


def test_shared_hessian_equals_separate_calls():
    W, _, H = outlier_problem(n_out=40, n_in=64)
    assert_shared_hessian_equals_separate_calls(quip, W, H, quip.QuIPParams(3), 24)


def test_dead_columns_are_zeroed():
    W, _, H = outlier_problem(n_out=32, n_in=64)
    H[5, :] = H[:, 5] = 0  # no input ever reaches column 5
    packed, stats = quip.quantize(W, H, quip.QuIPParams(2))
    assert np.isfinite(packed.dequantize()).all() and stats["loss"] < stats["rtn_loss"]


def test_bad_input_raises_user_error():
    with pytest.raises(UserError, match="bits"):
        quip.quantize(np.ones((4, 64), np.float32), np.eye(64), quip.QuIPParams(bits=5))
    with pytest.raises(UserError, match="divide"):
        layerwise.ldlq(np.ones((4, 60)), np.eye(60), quip.midrise_quantizer(1.0, 2), block=8)
