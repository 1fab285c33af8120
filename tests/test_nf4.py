"""nf4.py (QLoRA NF4 / FP4 with double quantization) against published values and a brute-force reference."""
import numpy as np
import pytest

import nf4
from runtime.errors import UserError
from runtime.formats.lut4 import DQ_BLOCK_SIZE, DQ_MAX_ERROR, unpack_nibbles

# QLoRA (Dettmers et al. 2023), Appendix E / bitsandbytes' NF4 lookup table
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
# OCP Microscaling Formats v1.0, E2M1 values by code 0..7 (codes 8..15: negatives), divided by 6
OCP_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def brute_force(W, table, block_size):
    """(codes [out, in], absmax [out, in/B]): argmin over all 16 table values of each normalized weight."""
    n_out, n_in = W.shape
    blocks = W.reshape(n_out, n_in // block_size, block_size)
    absmax = np.abs(blocks).max(axis=2)
    v = (blocks / absmax[:, :, None]).reshape(n_out, n_in, 1)
    codes = np.argmin(np.abs(v.astype(np.float64) - table.astype(np.float64)), axis=2)
    return codes, absmax


def gaussian(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_nf4_table_equals_published_values():
    table = nf4.nf4_table()
    assert table.dtype == np.float32 and table.shape == (16,)
    assert np.allclose(table, PUBLISHED_NF4, rtol=0, atol=1e-6)
    assert table[7] == 0.0 and table[0] == -1.0 and table[15] == 1.0


def test_fp4_table_is_ocp_e2m1():
    expected = np.array(OCP_E2M1 + [-v for v in OCP_E2M1]) / 6
    assert np.array_equal(nf4.fp4_table(), expected.astype(np.float32))


@pytest.mark.parametrize("dtype", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", [64, 128])
def test_quantize_dequantize_matches_brute_force(dtype, block_size):
    W = gaussian((33, 512), seed=block_size)
    table = nf4.nf4_table() if dtype == "nf4" else nf4.fp4_table()
    t = nf4.quantize(W, nf4.NF4Params(dtype=dtype, block_size=block_size))
    codes, absmax = brute_force(W, table, block_size)
    expected = table[codes] * np.repeat(absmax, block_size, axis=1)
    assert np.array_equal(t.dequantize(), expected)
    assert np.array_equal(t.absmax, absmax)
    assert np.array_equal(t.table, table)


@pytest.mark.parametrize("dtype", ["nf4", "fp4"])
def test_every_code_is_nearest(dtype):
    """No table value is closer to a normalized weight than the one its code picks."""
    rng = np.random.default_rng(7)
    W = np.concatenate([gaussian((16, 256), seed=8),  # plus exact table values, midpoints and zeros
                        np.tile(np.linspace(-1, 1, 256, dtype=np.float32), (4, 1)),
                        np.zeros((1, 256), dtype=np.float32)])
    W *= rng.uniform(0.1, 3, (W.shape[0], 1)).astype(np.float32)
    t = nf4.quantize(W, nf4.NF4Params(dtype=dtype))
    blocks = W.reshape(W.shape[0], -1, 64)
    absmax = np.abs(blocks).max(axis=2, keepdims=True)
    v = (blocks / np.where(absmax > 0, absmax, 1)).reshape(W.shape).astype(np.float64)
    table = t.table.astype(np.float64)
    chosen = np.abs(v - table[unpack_nibbles(t.qweight)])
    best = np.abs(v[..., None] - table).min(axis=2)
    assert np.all(chosen == best)


def test_double_quantized_absmax_within_documented_error():
    W = gaussian((300, 1024), seed=9) * np.linspace(0.2, 3.0, 300, dtype=np.float32)[:, None]
    plain = nf4.quantize(W, nf4.NF4Params())
    dq = nf4.quantize(W, nf4.NF4Params(double_quant=True))
    assert np.array_equal(plain.qweight, dq.qweight)  # codes come from the exact absmax
    true = plain.absmax.ravel().astype(np.float64)
    mean = true.mean()
    assert dq.absmax_mean[0] == pytest.approx(mean, rel=1e-6)
    runs = np.arange(true.size) // DQ_BLOCK_SIZE
    run_scale = np.array([np.abs(true[runs == r] - dq.absmax_mean[0]).max() for r in range(runs[-1] + 1)])
    assert np.allclose(dq.absmax_scale, run_scale, rtol=1e-6)
    error = np.abs(dq.block_absmax().ravel() - true)
    assert np.all(error <= DQ_MAX_ERROR * run_scale[runs] + 4 * 2.0**-23 * (abs(mean) + run_scale[runs]))
    assert error.max() > 0.5 * DQ_MAX_ERROR * run_scale.min()  # the bound is not vacuous


def test_nf4_beats_fp4_and_int4_on_gaussian_weights():
    """QLoRA §3 / Table 2: NF4 is the better 4-bit type for normally distributed weights."""
    W = gaussian((256, 1024), seed=10)

    def mse(approx):
        return float(np.mean((W - approx) ** 2))

    blocks = W.reshape(256, -1, 64)
    absmax = np.abs(blocks).max(axis=2, keepdims=True)
    int4 = (np.round(blocks / absmax * 7) / 7 * absmax).reshape(W.shape)  # symmetric absmax int4, 15 levels
    nf4_mse = mse(nf4.quantize(W, nf4.NF4Params(dtype="nf4")).dequantize())
    fp4_mse = mse(nf4.quantize(W, nf4.NF4Params(dtype="fp4")).dequantize())
    assert nf4_mse < fp4_mse
    assert nf4_mse < mse(int4)


def test_double_quant_changes_error_little():
    W = gaussian((128, 512), seed=11)
    plain = np.mean((W - nf4.quantize(W).dequantize()) ** 2)
    dq = np.mean((W - nf4.quantize(W, nf4.NF4Params(double_quant=True)).dequantize()) ** 2)
    assert dq == pytest.approx(plain, rel=0.02)


@pytest.mark.parametrize("W, params", [
    (np.zeros((4, 96), np.float32), nf4.NF4Params()),  # in not a multiple of 64
    (np.zeros((4, 64), np.float32), nf4.NF4Params(dtype="int4")),
    (np.zeros((4, 64), np.float32), nf4.NF4Params(block_size=12)),
    (np.zeros((4, 64), np.float32), nf4.NF4Params(block_size=0)),
    (np.zeros(64, np.float32), nf4.NF4Params()),
    (np.full((4, 64), np.nan, np.float32), nf4.NF4Params()),
])
def test_bad_input_raises_user_error(W, params):
    with pytest.raises(UserError):
        nf4.quantize(W, params)


def test_zero_blocks_quantize_to_zero():
    W = np.zeros((3, 128), np.float32)
    W[1, 64:] = gaussian((64,))
    for dtype in ("nf4", "fp4"):
        back = nf4.quantize(W, nf4.NF4Params(dtype=dtype)).dequantize()
        assert np.all(back[0] == 0) and np.all(back[1, :64] == 0)
