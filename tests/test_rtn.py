"""RTN: the rounding error bound, lossless re-quantization of grid values, the clipping search, parameters."""
import numpy as np
import pytest

import rtn
from runtime.errors import UserError
from runtime.formats.uniform import unpack
from runtime.quant_grid import find_grid, grid_error

BITS = (2, 3, 4, 8)


def grid_per_weight(packed):
    """(scale, zero) [out, in] of every weight, in original column order."""
    zeros = unpack(np.ascontiguousarray(packed.qzeros.T), packed.bits, packed.out_features).T  # [n_groups, out]
    g = np.asarray(packed.g_idx)
    return packed.scales[g].T.astype(np.float32), zeros[g].T.astype(np.float32)


def weights(seed, n_out=40, n_in=200):
    return np.random.default_rng(seed).standard_normal((n_out, n_in)).astype(np.float32)  # [out, in]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size, per_tensor", [(32, False), (128, False), (-1, False), (-1, True)])
@pytest.mark.parametrize("sym", [False, True])
def test_every_weight_within_half_a_step(bits, group_size, per_tensor, sym):
    W = weights(bits)
    packed = rtn.quantize(W, rtn.RTNParams(bits=bits, group_size=group_size, per_tensor=per_tensor, sym=sym))
    scale, _ = grid_per_weight(packed)
    assert np.all(np.abs(packed.dequantize() - W) <= scale * (0.5 + 1e-4))
    assert packed.per_tensor == per_tensor and packed.sym == sym
    if per_tensor:
        assert np.unique(packed.scales).size == 1
    if sym:
        assert np.all(grid_per_weight(packed)[1] == 2 ** (bits - 1))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [False, True])
def test_clipping_never_increases_the_error(bits, sym):
    W = np.random.default_rng(bits).standard_t(3, size=(40, 256)).astype(np.float32)  # heavy tails
    for g in range(2):
        block = W[:, 128 * g:128 * (g + 1)]  # [40, 128]
        plain = grid_error(block, *find_grid(block, bits, sym), bits)  # [40]
        clipped = grid_error(block, *find_grid(block, bits, sym, mse_clip=True), bits)  # [40]
        assert np.all(clipped <= plain * (1 + 1e-6))
        if bits <= 4:
            assert clipped.sum() < 0.99 * plain.sum()  # heavy-tailed rows: clipping pays at few bits
    packed = rtn.quantize(W, rtn.RTNParams(bits=bits, group_size=128, sym=sym, mse_clip=True))
    scale, zero = grid_per_weight(packed)
    inside = (W >= -zero * scale) & (W <= (2**bits - 1 - zero) * scale)  # within the clipped grid's range
    assert np.all(np.abs(packed.dequantize() - W)[inside] <= scale[inside] * (0.5 + 1e-4))


@pytest.mark.parametrize("bits", BITS)
def test_weights_on_a_grid_are_reproduced_exactly(bits):
    # each row: (q - z) * s with codes spanning 0 .. maxq, so the grid's own range is the row's range
    rng = np.random.default_rng(bits)
    maxq = 2**bits - 1
    codes = rng.integers(0, maxq + 1, size=(16, 64))
    codes[:, 0], codes[:, 1] = 0, maxq
    zero = rng.integers(1, maxq, size=(16, 1))
    scale = rng.uniform(0.01, 0.1, size=(16, 1)).astype(np.float16).astype(np.float32)
    W = ((codes - zero) * scale).astype(np.float32)  # [16, 64]
    packed = rtn.quantize(W, rtn.RTNParams(bits=bits, group_size=-1))
    np.testing.assert_allclose(packed.dequantize(), W, rtol=0, atol=1e-6 * np.abs(W).max())


def test_group_size_zero_means_per_row_and_ragged_groups():
    W = weights(0, n_out=9, n_in=100)
    assert rtn.quantize(W, rtn.RTNParams(group_size=0)).meta() == rtn.quantize(W, rtn.RTNParams(group_size=-1)).meta()
    packed = rtn.quantize(W, rtn.RTNParams(group_size=64))  # 100 columns: groups of 64 and 36
    assert packed.scales.shape == (2, 9)
    assert np.abs(packed.dequantize() - W).max() < np.abs(W).max() / 4


def test_zero_rows_and_float16_scales():
    W = weights(1, n_out=4, n_in=64)
    W[0] = 0
    packed = rtn.quantize(W, rtn.RTNParams(bits=4, group_size=32))
    assert packed.scales.dtype == np.float16 and np.all(packed.scales > 0)
    np.testing.assert_array_equal(packed.dequantize()[0], 0)


@pytest.mark.parametrize("params, W", [
    (rtn.RTNParams(bits=5), weights(0)),
    (rtn.RTNParams(group_size=48), weights(0)),
    (rtn.RTNParams(), np.zeros(64, dtype=np.float32)),
    (rtn.RTNParams(), np.full((4, 64), np.nan, dtype=np.float32)),
    (rtn.RTNParams(), np.full((4, 64), 1e9, dtype=np.float32) * np.arange(64)),
])
def test_bad_input_raises_user_error(params, W):
    with pytest.raises(UserError):
        rtn.quantize(W, params)
