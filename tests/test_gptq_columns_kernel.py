"""runtime/kernels/gptq_columns_numba.py: its float16 rounding against NumPy's, and the column loop against
the NumPy formulas it replaced (GPTQ's grid, SpQR's unrounded zero and outliers)."""
import numpy as np
import pytest

from runtime.kernels.gptq_columns_numba import round_columns, to_half


def test_to_half_equals_numpy():
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(20000) * 10.0 ** rng.integers(-9, 5, 20000),  # every range of half precision
        np.array([0.0, -0.0, 65504, 65519, 65520, -65520, 1e6, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
                  2.0 ** -14, 2.0 ** -14 - 2.0 ** -26, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, np.inf, -np.inf]),
    ]).astype(np.float32)  # ties to even at 1 + 2^-11, 1 + 3·2^-11, the subnormal 3·2^-26, overflow at 65520
    ours = np.array([to_half(v) for v in values], dtype=np.float32)
    with np.errstate(over="ignore"):  # the values past float16's range become infinity, as intended
        np.testing.assert_array_equal(ours, values.astype(np.float16).astype(np.float32))


def numpy_columns(W1, U, b1, i0, i1, group_of, scales, zeros, maxq, gptq_rounding, thresholds, mask):
    """The NumPy loop of gptq.obs_columns with the grids' former `quantize` (GPTQ's or SpQR's)."""
    codes1, Q1, E1 = np.zeros(W1.shape, np.uint8), np.zeros_like(W1), np.zeros_like(W1)
    for i in range(i0, i1):
        j = b1 + i
        s, z = scales[group_of[j]], zeros[group_of[j]]
        w = W1[i]
        if gptq_rounding:
            codes = np.clip(np.rint(w / s) + z.astype(np.int32), 0, maxq).astype(np.uint8)
            zero_code = np.clip(z.astype(np.int32), 0, maxq).astype(np.uint8)
        else:
            codes = np.clip(np.rint(w / s + z), 0, maxq).astype(np.uint8)
            zero_code = np.clip(np.rint(z), 0, maxq).astype(np.uint8)
        q = ((codes.astype(np.float32) - z) * s).astype(np.float32)
        if len(thresholds):
            outlier = ((w - q) / U[j, j]) ** 2 > thresholds
            codes[outlier] = zero_code[outlier]
            q[outlier] = w[outlier].astype(np.float16)
            mask[outlier, j] = True
        codes1[i], Q1[i] = codes, q
        E1[i] = (w - q) / U[j, j]
        W1[i:] -= np.outer(U[j, j:b1 + W1.shape[0]], E1[i])
    return codes1, Q1, E1


@pytest.mark.parametrize("gptq_rounding, outliers", [(True, False), (False, False), (False, True), (True, True)])
def test_columns_equal_the_numpy_loop(gptq_rounding, outliers):
    rng = np.random.default_rng(1)
    n_out, n_in, width, b1, bits = 24, 64, 16, 16, 3
    U = np.triu(rng.uniform(0.1, 1.0, (n_in, n_in))).astype(np.float32)  # [in, in] upper, positive diagonal
    W1 = rng.standard_normal((32, n_out)).astype(np.float32)  # [B, out] the block of positions 16 .. 47
    group_of = np.arange(n_in) // width
    scales = rng.uniform(0.2, 0.6, (n_in // width, n_out)).astype(np.float32)
    zeros = (rng.integers(2, 6, scales.shape) if gptq_rounding else rng.uniform(2, 5, scales.shape)).astype(
        np.float32)
    thresholds = rng.uniform(0.5, 3.0, n_out) if outliers else np.zeros(0)
    args = (U, b1, 0, 32, group_of, scales, zeros, (1 << bits) - 1, gptq_rounding, thresholds)
    expected_mask = np.zeros((n_out, n_in), dtype=bool)
    expected = numpy_columns(W1.copy(), *args, expected_mask)
    E1, codes1, Q1 = np.zeros_like(W1), np.zeros(W1.shape, np.uint8), np.zeros_like(W1)
    mask = np.zeros((n_out, n_in), dtype=bool)
    ours = W1.copy()
    round_columns(ours, E1, codes1, Q1, U, b1, 0, 16, *args[4:], mask)  # two runs, as between group fits
    round_columns(ours, E1, codes1, Q1, U, b1, 16, 32, *args[4:], mask)
    np.testing.assert_array_equal(codes1, expected[0])
    np.testing.assert_array_equal(Q1, expected[1])
    np.testing.assert_array_equal(E1, expected[2])
    np.testing.assert_array_equal(mask, expected_mask)
    assert mask.any() == outliers and len(np.unique(codes1)) == 1 << bits  # outliers found; every code used
