"""runtime/fptypes.py against ml_dtypes (and NumPy's float16): every code decodes to the same
value, and encoding a dense sweep of float32 values (ties, subnormals, overflow, NaN) gives the same bits."""
import ml_dtypes
import numpy as np
import pytest

from runtime import fptypes
from runtime.errors import UserError

ORACLES = [
    (fptypes.FP16, np.float16),
    (fptypes.BF16, ml_dtypes.bfloat16),
    (fptypes.FP8_E4M3, ml_dtypes.float8_e4m3fn),
    (fptypes.FP8_E5M2, ml_dtypes.float8_e5m2),
    (fptypes.FP4_E2M1, ml_dtypes.float4_e2m1fn),
]
IDS = [fmt.name for fmt, _ in ORACLES]


def all_codes(fmt):
    return np.arange(1 << fmt.bits, dtype=fmt.storage_dtype)


def oracle_encode(x, oracle, fmt):
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(oracle).view(fmt.storage_dtype)


def sweep(fmt):
    """float32 inputs: every value of the type, the midpoints between neighbours (ties) and the
    float32 numbers just beside them, values past the largest, float32 subnormals, random bit patterns."""
    values = fptypes.decode(all_codes(fmt), fmt).astype(np.float64)
    finite = np.unique(values[np.isfinite(values)])  # sorted
    top = finite[-1]
    edges = np.concatenate([finite, [top + (top - finite[-2])]])  # one step past the largest: overflow ties
    ties = ((edges[:-1] + edges[1:]) / 2).astype(np.float32)  # exact in float32 for these narrow types
    beside = np.concatenate([np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))])
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e38, 3.4e38, 1e-45, -1e-45, 1.1754942e-38],
                        dtype=np.float32)
    with np.errstate(over="ignore"):  # bf16's step past the largest is past float32's range: inf
        edges = edges.astype(np.float32)
    x = np.concatenate([edges, ties, beside, random_bits, specials])
    x = np.concatenate([x, -x])
    if fmt.specials == "none":
        x = x[~np.isnan(x)]
    return x


@pytest.mark.parametrize("fmt, oracle", ORACLES, ids=IDS)
def test_decode_every_code(fmt, oracle):
    codes = all_codes(fmt)
    ours = fptypes.decode(codes, fmt)
    theirs = codes.view(oracle).astype(np.float32)
    assert np.array_equal(np.isnan(ours), np.isnan(theirs))
    keep = ~np.isnan(ours)
    assert np.array_equal(ours[keep].view(np.uint32), theirs[keep].view(np.uint32))  # also the sign of zero


@pytest.mark.parametrize("fmt, oracle", ORACLES, ids=IDS)
def test_encode_matches_oracle(fmt, oracle):
    x = sweep(fmt)
    ours = fptypes.encode(x, fmt)
    theirs = oracle_encode(x, oracle, fmt)
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan], theirs[~nan])
    # NaN: a NaN code of the same sign (NumPy's float16 keeps payloads; we write the canonical NaN)
    back = fptypes.decode(ours[nan], fmt)
    assert np.isnan(back).all()
    assert np.array_equal(np.signbit(back), np.signbit(x[nan]))


@pytest.mark.parametrize("fmt, oracle", ORACLES, ids=IDS)
def test_saturate_is_clip_then_convert(fmt, oracle):
    """satfinite: out-of-range values and infinities clamp to ±max finite; NaN stays NaN."""
    x = sweep(fmt)
    x = x[~np.isnan(x)]
    top = np.float32(fmt.max_finite)
    expected = oracle_encode(np.clip(x, -top, top), oracle, fmt)
    assert np.array_equal(fptypes.encode(x, fmt, saturate=True), expected)


def test_published_limits_and_special_codes():
    assert fptypes.FP8_E4M3.max_finite == 448.0
    assert fptypes.FP8_E5M2.max_finite == 57344.0
    assert fptypes.FP16.max_finite == 65504.0
    assert fptypes.FP4_E2M1.max_finite == 6.0
    e4m3 = fptypes.FP8_E4M3
    # 464 is the tie between 448 (mantissa 110, even) and 480 (would be the NaN code S.1111.111)
    assert fptypes.encode(np.float32([464.0, -464.0]), e4m3).tolist() == [0x7E, 0xFE]
    assert fptypes.encode(np.float32([464.1, np.inf]), e4m3).tolist() == [0x7F, 0x7F]
    assert fptypes.encode(np.float32([1e9, -np.inf, np.nan]), e4m3, saturate=True).tolist() == [0x7E, 0xFE, 0x7F]
    assert fptypes.encode(np.float32([np.inf]), fptypes.FP8_E5M2).tolist() == [0x7C]
    assert fptypes.encode(np.float32([2.0**-9]), e4m3).tolist() == [0x01]  # smallest subnormal


def test_fp4_rejects_nan():
    with pytest.raises(UserError):
        fptypes.encode(np.float32([1.0, np.nan]), fptypes.FP4_E2M1)
