"""The int8 methods (int8.py): LLM.int8(), naive absmax int8 and SmoothQuant's factors.

The quantizer is checked against the absmax definitions (one scale per row
or per tensor, error at most half a step); on a synthetic layer whose input
has a few channels 50-100x larger than the rest (the emergent outlier
features of LLM.int8 §4 / SmoothQuant §3), the papers' claims are asserted:
the decomposition keeps the error far below naive absmax int8's, and
smoothing keeps W8A8 per-token error below unsmoothed W8A8 per-token.
"""
import numpy as np
import pytest

import int8
from runtime.errors import UserError


def relative_error(y, reference):
    return float(np.linalg.norm(y - reference) / np.linalg.norm(reference))


@pytest.fixture(scope="module")
def outlier_layer():
    """(x [64, 512] with 4 channels scaled by 50-100, W [256, 512], x @ W.T in float64)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    x[:, rng.choice(512, 4, replace=False)] *= rng.uniform(50, 100, 4).astype(np.float32)
    W = (rng.standard_normal((256, 512)) * 0.05).astype(np.float32)
    return x, W, x.astype(np.float64) @ W.T.astype(np.float64)


def test_row_scales_are_absmax_over_127():
    W = np.random.default_rng(1).standard_normal((30, 70)).astype(np.float32)
    W[3] = 0.0  # an all-zero row stays zero
    t = int8.quantize(W, int8.LLM_INT8)
    absmax = np.abs(W).max(axis=1)
    assert np.allclose(t.scales[absmax > 0], absmax[absmax > 0] / 127, rtol=1e-7)
    assert np.abs(t.qweight.astype(int)).max(axis=1)[absmax > 0].min() == 127  # every row uses the full grid
    assert not t.qweight[3].any()
    assert np.all(np.abs(t.dequantize() - W) <= t.scales[:, None] / 2 * (1 + 1e-6))
    assert t.outlier_threshold == 6.0 and t.activation == "token"


def test_absmax8_has_one_scale():
    W = np.random.default_rng(2).standard_normal((30, 70)).astype(np.float32)
    t = int8.quantize(W, int8.ABSMAX8)
    assert t.scales.shape == (1,) and t.scales[0] == pytest.approx(np.abs(W).max() / 127, rel=1e-7)
    assert np.all(np.abs(t.dequantize() - W) <= t.scales[0] / 2 * (1 + 1e-6))
    assert t.activation == "tensor" and t.outlier_threshold is None


def test_llm_int8_decomposition_beats_absmax_int8(outlier_layer):
    x, W, reference = outlier_layer
    llm_int8 = relative_error(int8.quantize(W, int8.LLM_INT8).matmul(x), reference)
    vector_wise = relative_error(int8.quantize(W, int8.SMOOTH8).matmul(x), reference)  # no decomposition
    absmax8 = relative_error(int8.quantize(W, int8.ABSMAX8).matmul(x), reference)
    assert llm_int8 < absmax8 / 5
    assert llm_int8 < vector_wise / 3
    assert llm_int8 < 0.02


def test_smoothquant_beats_plain_per_token_int8(outlier_layer):
    x, W, reference = outlier_layer
    s = int8.smoothing_factors(np.abs(x).max(axis=0), np.abs(W).max(axis=0))  # [in]
    assert np.allclose((x / s) @ (W * s).T, reference, rtol=1e-4, atol=1e-4)  # smoothing alone is exact
    smoothed = relative_error(int8.quantize(W * s, int8.SMOOTH8).matmul(x / s), reference)
    plain = relative_error(int8.quantize(W, int8.SMOOTH8).matmul(x), reference)
    assert smoothed < plain / 3


def test_smoothing_factors_formula():
    # SmoothQuant Eq. 4: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)
    act, weight = np.array([4.0, 1.0, 9.0]), np.array([1.0, 4.0, 0.0])
    assert np.allclose(int8.smoothing_factors(act, weight, 0.5), [2.0, 0.5, 3.0 / np.sqrt(1e-5)])
    assert np.allclose(int8.smoothing_factors(act, weight, 1.0), act)
    assert np.allclose(int8.smoothing_factors(np.zeros(3), weight, 0.5), 1e-5)  # floored, never 0
    with pytest.raises(UserError):
        int8.smoothing_factors(act, weight, 1.5)


def test_bad_input_raises_user_error():
    with pytest.raises(UserError):
        int8.quantize(np.zeros(5, dtype=np.float32))
    with pytest.raises(UserError):
        int8.quantize(np.full((2, 2), np.nan, dtype=np.float32))
    with pytest.raises(UserError):
        int8.quantize(np.ones((2, 2), dtype=np.float32), int8.Int8Params(weight_scales="group"))
