"""SpQR (spqr.py) against GPTQ, against RTN, and on a layer with planted outliers."""
import math

import numpy as np
import pytest

from conftest import assert_shared_hessian_equals_separate_calls
import gptq
import layerwise
import spqr
from runtime.errors import UserError
from runtime.formats.uniform import unpack


def problem(n_out=48, n_in=128, seed=0, planted=0):
    """A random weight W [out, in] (with `planted` weights 10x larger), correlated calibration inputs
    X [in, n] and H = 2/n X Xᵀ."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_out, n_in)).astype(np.float32)  # [out, in]
    if planted:
        rows, cols = rng.integers(0, n_out, planted), rng.integers(0, n_in, planted)
        W[rows, cols] = 10 * np.sign(W[rows, cols]) * (1 + np.abs(W[rows, cols]))
    mix = np.eye(n_in) + 0.3 * rng.standard_normal((n_in, n_in))  # [in, in]
    X = mix @ rng.standard_normal((n_in, 2 * n_in)) * rng.uniform(0.2, 3.0, (n_in, 1))  # [in, n]
    return W, 2 / X.shape[1] * X @ X.T


def codes_of(packed):
    """The base codes [out, in] of a SpQRTensor in original column order."""
    stored = unpack(packed.qweight, packed.bits, packed.in_features).T  # [out, in] storage order
    codes = np.empty_like(stored)
    codes[:, packed.perm] = stored
    return codes


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("act_order", [False, True])
def test_equals_gptq_without_outliers_and_with_float16_statistics(bits, group, act_order):
    W, H = problem(n_in=192, seed=bits)
    params = spqr.SpQRParams(bits=bits, group_size=group, outlier_threshold=math.inf, stat_bits=16,
                             act_order=act_order)
    packed, stats = spqr.quantize(W, H, params)
    reference = gptq.quantize_columns(W, H, gptq.GPTQParams(bits, group, act_order=act_order))
    assert stats["outliers"] == packed.outliers.nnz == 0
    np.testing.assert_array_equal(codes_of(packed), reference.codes)
    np.testing.assert_array_equal(packed.dequantize(), reference.Q)
    gptq_packed, gptq_stats = gptq.quantize(W, H, gptq.GPTQParams(bits, group, act_order=act_order))
    np.testing.assert_array_equal(packed.dequantize(), gptq_packed.dequantize())
    # both losses come from the column loop's scaled errors (gptq.obs_columns, layerwise.undamped_losses)
    assert stats["loss"] == pytest.approx(gptq_stats["loss"], rel=1e-6)
    assert stats["rtn_loss"] == pytest.approx(gptq_stats["rtn_loss"], rel=1e-6)


def test_outliers_are_kept_exactly_and_beat_gptq_on_planted_outliers():
    W, H = problem(n_out=64, n_in=128, seed=1, planted=40)
    packed, stats = spqr.quantize(W, H, spqr.SpQRParams(bits=3, group_size=32))
    _, gptq_stats = gptq.quantize(W, H, gptq.GPTQParams(3, 32, act_order=True))
    assert stats["loss"] < 0.5 * gptq_stats["loss"]
    assert stats["loss"] < stats["rtn_loss"] and stats["ratio"] == pytest.approx(stats["loss"] / stats["rtn_loss"])
    planted = np.abs(W) > 5  # [out, in]
    w_q = packed.dequantize()
    outliers = packed.outliers
    rows, cols = outliers.rows(), outliers.col_idx.astype(np.int64)
    is_outlier = np.zeros(W.shape, dtype=bool)
    is_outlier[rows, cols] = True
    assert is_outlier[planted].mean() > 0.9  # nearly every planted weight became an outlier
    assert stats["outliers"] == outliers.nnz < 0.1 * W.size
    np.testing.assert_array_equal(w_q[rows, cols], outliers.values.astype(np.float32))  # float16, exactly
    # a planted weight never meets a grid or an error update before its column comes up: kept as it was
    first_columns = np.argsort(-np.diag(H), kind="stable")[:1]
    np.testing.assert_array_equal(w_q[:, first_columns][planted[:, first_columns]],
                                  W[:, first_columns][planted[:, first_columns]].astype(np.float16))
    D = (W - w_q).astype(np.float64)  # [out, in]
    # the loss from the loop's own errors, outliers included, equals the product by H of the stored weight
    assert stats["loss"] == pytest.approx(np.einsum("oi,ij,oj->", D, H, D), rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_small_groups_and_quantized_statistics_beat_rtn(bits):
    W, H = problem(n_in=160, seed=2)  # 160 = 10 groups of 16, blocks of 128 and 32
    packed, stats = spqr.quantize(W, H, spqr.SpQRParams(bits=bits))
    assert stats["ratio"] < 1
    assert stats["bits"] == packed.bits_per_weight
    assert packed.stat_bits == 3 and packed.group_size == 16 and packed.n_groups == 10


@pytest.mark.parametrize("bits, width", [(2, 16), (3, 16), (4, 7)])
def test_leave_one_out_kernel_matches_numpy(bits, width):
    from runtime.kernels.leave_one_out_numba import minmax_leave_one_out_gain
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((300, width)).astype(np.float32)  # [rows, n]
    w[:20] *= rng.uniform(0.01, 50, (20, 1)).astype(np.float32)  # rows of very different scales
    w[20] = 0  # an all-zero row (scale 1)
    w[21] = 0.5  # all weights equal
    w[22, 3] = 40  # one planted outlier
    u = rng.uniform(0.05, 2, width).astype(np.float32)  # [n] U_kk
    fit = spqr.RowGridFit(bits, stat_bits=3)
    expected = spqr.leave_one_out_gain(w, u, fit)  # [rows, n] NumPy, float32 sums in another order
    gain = minmax_leave_one_out_gain(w, u, fit.maxq)
    scale = np.maximum(np.abs(expected).max(axis=1, keepdims=True), 1e-6 * np.abs(expected).max())  # [rows, 1]
    np.testing.assert_allclose(gain / scale, expected / scale, rtol=0, atol=1e-5)
    assert np.argmax(gain[22]) == 3  # the outlier gains most from being left out


def test_fewer_outliers_with_a_higher_threshold():
    W, H = problem(seed=3)
    counts = [spqr.quantize(W, H, spqr.SpQRParams(outlier_threshold=tau))[1]["outliers"]
              for tau in (0.05, 0.2, 1.0, math.inf)]
    assert counts[0] > counts[1] > counts[2] >= counts[3] == 0


def test_shared_hessian_equals_separate_calls():
    W, H = problem(n_out=40, seed=4, planted=10)
    assert_shared_hessian_equals_separate_calls(spqr, W, H, spqr.SpQRParams(stat_group=8), 24)


def test_dead_columns_are_zeroed():
    W, H = problem(n_in=64, seed=5)
    H[5, :] = H[:, 5] = 0  # no input ever reaches column 5
    packed, stats = spqr.quantize(W, H)
    assert np.isfinite(packed.dequantize()).all() and stats["loss"] < stats["rtn_loss"]
    # float16 statistics keep GPTQ's integer zero point, on which 0 is exact
    packed, _ = spqr.quantize(W, H, spqr.SpQRParams(stat_bits=16))
    assert np.all(packed.dequantize()[:, 5] == 0)


def test_an_all_zero_row_keeps_its_statistics_block_tight():
    W, H = problem(n_in=64, seed=6)
    W[3] = 0  # [in] an output no input reaches
    packed, stats = spqr.quantize(W, H)
    scales, _ = packed.statistics()  # [n_groups, out]
    block = np.delete(scales[:, :16], 3, axis=1)  # [n_groups, 15] the rest of its statistics block
    assert np.all(scales[:, 3] <= block.max(axis=1))  # not the placeholder scale 1 of a lone row
    assert np.abs(packed.dequantize()[3]).max() < 0.1 * np.abs(W).max() and stats["ratio"] < 1


def test_bad_parameters_raise_user_error():
    W, H = problem(n_in=64)
    bad = [dict(bits=8), dict(group_size=24), dict(stat_bits=1), dict(stat_group=0), dict(outlier_threshold=0),
           dict(outlier_threshold=-1.0), dict(percdamp=-0.1), dict(blocksize=0)]
    for fields in bad:
        with pytest.raises(UserError, match="spqr"):
            spqr.quantize(W, H, spqr.SpQRParams(**fields))
