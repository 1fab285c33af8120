"""Small floating-point storage types: encode float32 to their bits and back.

Reference code (NumPy, exact) for the narrow float types the formats store:

| name         | sign.exponent.mantissa | bias | specials                      | max finite |
| ------------ | ---------------------- | ---- | ----------------------------- | ---------- |
| fp16         | 1.5.10                 | 15   | IEEE 754 binary16: inf, NaNs  | 65504      |
| bf16         | 1.8.7                  | 127  | IEEE-like (float32's top half)| 3.39e38    |
| fp8_e4m3fn   | 1.4.3                  | 7    | no inf; NaN = S.1111.111 only | 448        |
| fp8_e5m2     | 1.5.2                  | 15   | IEEE-like: inf, NaNs          | 57344      |
| fp4_e2m1fn   | 1.2.1                  | 1    | none: all 16 codes finite     | 6          |

The two fp8 types follow "FP8 Formats for Deep Learning" (Micikevicius et
al. 2022) as adopted by the OCP 8-bit Floating Point Specification (OFP8)
and NVIDIA's `__nv_fp8_e4m3` / `__nv_fp8_e5m2`; fp4_e2m1fn is the OCP
Microscaling Formats (MX) v1.0 element type E2M1.

Encoding rounds to nearest, ties to even (IEEE 754 roundTiesToEven), with
subnormals kept. Values too large for the type are handled by `saturate`:

- `saturate=False` (default; IEEE 754, `ml_dtypes`, CUDA's `__NV_NOSAT`):
  overflow and infinities become inf where the type has one (fp16, bf16,
  e5m2) and NaN in e4m3fn, which has no inf. A value overflows when it
  rounds above the largest finite value, e.g. e4m3fn: |x| < 464 -> 448,
  464 (a tie, 448 is even) -> 448, |x| > 464 -> NaN.
- `saturate=True` (PTX `cvt ... .satfinite`, CUDA's `__NV_SATFINITE`):
  finite values beyond the range and infinities clamp to the largest finite
  value of the same sign (±448 for e4m3fn); NaN stays NaN.

fp4_e2m1fn has neither inf nor NaN, so it always saturates (to ±6) and a NaN
input is an error. A NaN is encoded as the type's canonical NaN with the
input's sign (exponent all ones, top mantissa bit set; all ones in e4m3fn).

The input is taken as float32 (wider inputs are first rounded to float32),
and all arithmetic is done exactly in float64 on the float32 values.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import UserError


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point layout: 1 sign bit, then exponent, then mantissa bits.

    `specials` says what the all-ones exponent means: "ieee" (mantissa 0 is
    inf, anything else NaN), "fn" (finite: only the all-ones code is NaN, no
    inf), or "none" (every code is a finite number).
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    specials: str

    @property
    def bits(self) -> int:
        """Total width in bits, sign included."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def storage_dtype(self):
        """The unsigned integer type holding one code."""
        return np.uint16 if self.bits > 8 else np.uint8

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal binade (subnormals share it)."""
        return 1 - self.bias

    @property
    def max_code(self) -> int:
        """Magnitude bits (sign cleared) of the largest finite value."""
        exp_ones = (1 << self.exponent_bits) - 1
        man_ones = (1 << self.mantissa_bits) - 1
        if self.specials == "ieee":
            return ((exp_ones - 1) << self.mantissa_bits) | man_ones
        if self.specials == "fn":
            return (exp_ones << self.mantissa_bits) | (man_ones - 1)
        return (exp_ones << self.mantissa_bits) | man_ones

    @property
    def inf_code(self) -> int:
        """Magnitude bits of +inf ("ieee" types only)."""
        return ((1 << self.exponent_bits) - 1) << self.mantissa_bits

    @property
    def nan_code(self) -> int:
        """Magnitude bits of the canonical (quiet) NaN."""
        if self.specials == "ieee":
            return self.inf_code | (1 << (self.mantissa_bits - 1))
        return (1 << (self.exponent_bits + self.mantissa_bits)) - 1

    @property
    def max_finite(self) -> float:
        """The largest finite value."""
        return float(decode(np.array(self.max_code), self))


FP16 = FloatFormat("fp16", 5, 10, 15, "ieee")
BF16 = FloatFormat("bf16", 8, 7, 127, "ieee")
FP8_E4M3 = FloatFormat("fp8_e4m3fn", 4, 3, 7, "fn")
FP8_E5M2 = FloatFormat("fp8_e5m2", 5, 2, 15, "ieee")
FP4_E2M1 = FloatFormat("fp4_e2m1fn", 2, 1, 1, "none")


def encode(x, fmt: FloatFormat, saturate: bool = False) -> np.ndarray:
    """Codes of `fmt` nearest to float32 values `x` (ties to even); same shape, uint8/uint16."""
    x = np.asarray(x, dtype=np.float32)
    if fmt.specials == "none" and np.isnan(x).any():
        raise UserError(f"{fmt.name} has no NaN code: remove NaNs from the input before encoding")
    man = fmt.mantissa_bits
    sign = np.signbit(x).astype(np.int64)
    finite = np.isfinite(x)
    a = np.abs(np.where(finite, x, 0).astype(np.float64))  # (inf and NaN are coded below)
    _, e = np.frexp(a)  # a = m * 2**e with m in [0.5, 1)
    exp = np.maximum(e.astype(np.int64) - 1, fmt.emin)  # binade of a; subnormals share emin
    q = np.rint(np.ldexp(a, man - exp)).astype(np.int64)  # a / quantum, rounded half to even
    carry = q == (2 << man)  # rounded up into the next binade
    exp = np.where(carry, exp + 1, exp)
    q = np.where(carry, 1 << man, q)
    normal = q >= (1 << man)
    mag = np.where(normal, ((exp + fmt.bias) << man) | (q - (1 << man)), q)

    too_big = (mag > fmt.max_code) | ~finite
    if saturate or fmt.specials == "none":
        big_code = fmt.max_code
    elif fmt.specials == "ieee":
        big_code = fmt.inf_code
    else:
        big_code = fmt.nan_code
    mag = np.where(too_big, big_code, mag)
    mag = np.where(np.isnan(x), fmt.nan_code, mag)
    bits = (sign << (fmt.bits - 1)) | mag
    return bits.astype(fmt.storage_dtype)


def decode(bits, fmt: FloatFormat) -> np.ndarray:
    """float32 values of codes `bits` (integers) of type `fmt`; same shape."""
    b = np.asarray(bits).astype(np.int64)
    man = fmt.mantissa_bits
    sign = (b >> (fmt.bits - 1)) & 1
    field = (b >> man) & ((1 << fmt.exponent_bits) - 1)
    frac = b & ((1 << man) - 1)
    subnormal = np.ldexp(frac.astype(np.float64), fmt.emin - man)
    normal = np.ldexp((frac + (1 << man)).astype(np.float64), field - fmt.bias - man)
    value = np.where(field == 0, subnormal, normal)
    mag = b & ((1 << (fmt.bits - 1)) - 1)
    if fmt.specials == "ieee":
        value = np.where(mag == fmt.inf_code, np.inf, value)
        value = np.where(mag > fmt.inf_code, np.nan, value)
    elif fmt.specials == "fn":
        value = np.where(mag == fmt.nan_code, np.nan, value)
    return np.where(sign == 1, -value, value).astype(np.float32)
