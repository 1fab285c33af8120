"""The E8P lattice codebook of QuIP# and its residual (RVQ) extensions to 3 and 4 bits.

Tseng, Chee, Sun, Kuleshov, De Sa 2024, "QuIP#: Even Better LLM Quantization
with Hadamard Incoherence and Lattice Codebooks", §4.2 (E8P) and §4.3 (RVQ).

E8 = D8 ∪ (D8 + ½·1) with D8 = {z ∈ Z^8 : Σ z even}; its half-integer coset
D̂8 = {x ∈ (Z + ½)^8 : Σ x even} is what E8P is built from. A point of D̂8 is
σ ⊙ a with a = |x| ∈ {½, 3/2, 5/2, ...}^8 and signs σ; flipping one sign
changes Σ x by the odd integer 2 a_i, so for a given a exactly half of the 2^8
sign patterns land in D̂8: the number of minus signs must have the parity of
Σ a (an integer). E8P ("E8 padded") is

    source set S: the 227 vectors a ∈ {½, 3/2, 5/2, ...}^8 with |a|² ≤ 10, plus
                  29 of the 56 vectors with five entries 3/2 and three ½ (|a|² = 12)
    E8P = {σ ⊙ a ± ¼·1 : a ∈ S, σ ⊙ a ∈ D̂8}          2^8 · 2^7 · 2 = 2^16 points

The paper fixes the count (29 of norm √12) but not which 29. Two variants
(`VARIANTS`; a tensor's `codebook` says which) differ only in that choice and
in their order:

    "lexicographic"  (this project's quantizer, the default) the first 29 of
                     the 56 in lexicographic order of 2a; S sorted by norm,
                     then lexicographically
    "quip-sharp"     the 29 of the QuIP# reference (lib/codebook/
                     latticee8_padded12.py `get_norm12`, `QUIP_SHARP_NORM12`)
                     in its order (`get_abs_grid`: the 227 lexicographically,
                     then those 29), so imported checkpoints decode exactly

Which half of the positions holds the ½'s changes the Gaussian MSE by well
under 1%. The ±¼ shift makes the codebook symmetric (x in the codebook ⇔ -x
in it).

16-bit code (a uint16; bit 0 is the least significant):

    bit  15            8 7                       1   0
        +---------------+-------------------------+-----+
        | source index j | neg_7 neg_6 ... neg_1   |shift|
        +---------------+-------------------------+-----+

    point = σ ⊙ S[j] + (¼ if shift else -¼),  σ_k = -1 iff bit k is set (k = 1..7),
    σ_0 = -1 iff (bits 1..7 set + Σ S[j]) is odd      (the parity rule of D̂8)

This is the field order of the QuIP# reference (source index in the high
byte, 7 sign bits, the shift in bit 0 with 1 meaning +¼); the sign of
coordinate k sits in bit k.

Scales. The codebook is used at a fixed scale: data of RMS σ (incoherent
weights are close to i.i.d. Gaussian) is quantized as x ≈ σ · s · point with
the stage scale s of `STAGE_SCALES` (`E8P_SCALE` = 0.965 at 2 bits), fitted
here to minimise the MSE of unit-variance Gaussian data. The codebook's own
RMS (over all coordinates of `codebook()`) is about 1.094: at the 2-bit scale the points stand
for values of RMS 0.965 · 1.094 σ = 1.056 σ, so matching the two RMS values
(scale 1 / 1.094 = 0.914) would be close to, but not at, the MSE optimum.

Residual vector quantization (§4.3): a second stage quantizes the residual
of the first, at a smaller scale.
  4 bits: E8P + E8P                                  (16 + 16 bits per 8 weights)
  3 bits: E8P + a 1-bit code of 8-dim E8 points       (16 + 8 bits per 8 weights)
The 1-bit codebook (`e8_1bit_codebook`) is the 241 points of E8 with |x|² ≤ 2
(the origin and the 240 roots) plus 15 of the 16 points ±2 e_i, one uint8 per
8 weights: "lexicographic" leaves out +2 e_0, "quip-sharp" -2 e_7 (`get_e81bgrid`).
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from runtime.errors import UserError
from runtime.kernels.e8p_encode_numba import encode_rows

DIM = 8
N_SOURCE = 256
N_CODES = 1 << 16
SHIFT = 0.25
ENCODE_CHUNK = 2048  # vectors per step of `e8_1bit_encode` (its [chunk, 256] temporaries are 2 MiB each)
BITS = (2, 3, 4)
VARIANTS = ("lexicographic", "quip-sharp")  # which 29 norm-12 source vectors (module docstring)
DEFAULT_VARIANT = "lexicographic"
# The QuIP# reference's 29 norm-12 source vectors (get_norm12) as 2a: five 3s and three 1s each.
QUIP_SHARP_NORM12 = ("31113333", "13113333", "11313333", "11133333", "33313311", "33313131", "33311331", "33313113",
                     "33311313", "33311133", "33133311", "33133131", "33131331", "33133113", "33131313", "33131133",
                     "31333311", "31333131", "31331331", "31333113", "31331313", "13331133", "13333311", "13333131",
                     "13331331", "13333113", "13331313", "11331333", "33113331")

# Stage scales: x ≈ Σ_k s_k · decode_k(code_k) for unit-variance Gaussian x. Fitted
# here by grid search (s_1 in steps of 0.01, then s_1 / s_2 in steps of 0.05) on
# 2^15 - 2^16 Gaussian vectors, giving per-coordinate MSEs of 0.0916 (2 bits),
# 0.0297 (3 bits) and 0.0084 (4 bits). The QuIP# reference implementation states
# the same quantities as data multipliers (1/s_1) and residual multipliers
# (s_1/s_2): 1.0 (2 bits), 0.98 and 2.04 (3 bits), 1.03 and 3.45 (4 bits); ours
# agree within 4% at 2 and 3 bits; at 4 bits our grid finds a lower MSE further out.
E8P_SCALE = 0.965  # 2 bits: data of RMS σ is quantized as σ · E8P_SCALE · point
STAGE_SCALES = {2: (E8P_SCALE,), 3: (1.02, 1.02 / 2.05), 4: (1.13, 1.13 / 3.85)}


def _odd_vectors(max_doubled: int) -> np.ndarray:
    """All 8-vectors with odd entries 1, 3, ..., max_doubled (that is 2a for a in {½, 3/2, ...}^8)."""
    values = range(1, max_doubled + 1, 2)
    return np.array(list(itertools.product(values, repeat=DIM)), dtype=np.int64)  # [count, 8]


def _read_only(table: np.ndarray) -> np.ndarray:
    """`table`, made read-only (the cached tables are shared by every caller)."""
    table.setflags(write=False)
    return table


def _checked_codes(codes, dtype, what: str, hint: str = "") -> np.ndarray:
    """`codes` as an array; UserError unless its dtype is `dtype`."""
    codes = np.asarray(codes)
    if codes.dtype != dtype:
        raise UserError(f"{what}: codes must be {np.dtype(dtype)}, got {codes.dtype}{hint}")
    return codes


def check_variant(variant: str) -> None:
    """UserError unless `variant` names a codebook variant."""
    if variant not in VARIANTS:
        raise UserError(f"E8P: codebook variant must be one of {VARIANTS}, got {variant!r}; the file is from another "
                        f"version, re-quantize the model")


@functools.lru_cache(maxsize=None)
def _source_doubled(variant: str) -> np.ndarray:
    """2 · S as int64 [256, 8] of a codebook variant (module docstring; read-only)."""
    check_variant(variant)
    doubled = _odd_vectors(5)  # [3^8, 8] lexicographic; 7² > 48 so no entry above 5/2 reaches |a|² ≤ 12
    norm4 = (doubled ** 2).sum(axis=1)  # [3^8] = 4 |a|²
    inner = doubled[norm4 <= 40]  # [227, 8] |a|² ≤ 10
    if variant == "quip-sharp":
        shell = np.array([[int(ch) for ch in row] for row in QUIP_SHARP_NORM12], dtype=np.int64)  # [29, 8]
    else:
        shell = doubled[(norm4 == 48) & ((doubled == 3).sum(axis=1) == 5)]  # [56, 8] five 3/2, three 1/2
        shell = shell[:N_SOURCE - len(inner)]  # [29, 8] first in lexicographic order
        inner = inner[np.argsort((inner ** 2).sum(axis=1), kind="stable")]  # by norm, then lex
    table = np.concatenate([inner, shell])  # [256, 8]
    return _read_only(table)


def source_codebook(variant: str = DEFAULT_VARIANT) -> np.ndarray:
    """S [256, 8] float32: the absolute values (entries in {½, 3/2, 5/2}) the codes index."""
    return (_source_doubled(variant) / 2).astype(np.float32)


@functools.lru_cache(maxsize=None)
def source_parity(variant: str = DEFAULT_VARIANT) -> np.ndarray:
    """[256] uint8: Σ S[j] mod 2 (the parity the number of minus signs must have; read-only)."""
    parity = ((_source_doubled(variant).sum(axis=1) // 2) % 2).astype(np.uint8)  # [256]
    return _read_only(parity)


@functools.lru_cache(maxsize=None)
def signed_source_table(variant: str = DEFAULT_VARIANT) -> np.ndarray:
    """[256, 8] float32 S with coordinate 0 negated where Σ S[j] is odd (read-only).

    With it a code decodes without a parity lookup: coordinate k ≥ 1 is
    negated by sign bit k, coordinate 0 by the parity of the 7 sign bits,
    then the shift is added. The kernels use this table.
    """
    table = source_codebook(variant).copy()  # [256, 8]
    table[:, 0] *= 1.0 - 2.0 * source_parity(variant)
    return _read_only(table)


@functools.lru_cache(maxsize=None)
def sign_table() -> np.ndarray:
    """[128, 8] float32 (read-only): row b = the signs a code with sign bits b (bits 1..7, shifted down)
    gives coordinates 0..7 of a `signed_source_table` row: coordinate k ≥ 1 is −1 where bit k − 1 of b
    is set, coordinate 0 is −1 where b has an odd number of set bits (the parity rule). The kernels
    decode a code as signed_source_table()[code >> 8] * sign_table()[(code >> 1) & 127] ± ¼."""
    bits = (np.arange(128)[:, None] >> np.arange(7)) & 1  # [128, 7]
    negative = np.concatenate([bits.sum(axis=1, keepdims=True) & 1, bits], axis=1)  # [128, 8]
    table = (1 - 2 * negative).astype(np.float32)  # [128, 8]
    return _read_only(table)


def decode(codes, variant: str = DEFAULT_VARIANT) -> np.ndarray:
    """uint16 codes [...] -> float32 points [..., 8] of the E8P codebook (layout in the module docstring)."""
    codes = _checked_codes(codes, np.uint16, "E8P decode", "; cast with .astype(np.uint16)")  # [...]
    c = codes.astype(np.int64)  # [...]
    source = c >> 8  # [...]
    neg = (c[..., None] >> np.arange(DIM)) & 1  # [..., 8] bit k for k >= 1; bit 0 is the shift
    flips = neg[..., 1:].sum(axis=-1)  # [...]
    neg[..., 0] = (flips + source_parity(variant)[source]) & 1
    points = source_codebook(variant)[source] * (1.0 - 2.0 * neg).astype(np.float32)  # [..., 8]
    shift = np.where(c & 1, SHIFT, -SHIFT).astype(np.float32)  # [...]
    return points + shift[..., None]


@functools.lru_cache(maxsize=None)
def codebook(variant: str = DEFAULT_VARIANT) -> np.ndarray:
    """All 2^16 E8P points [65536, 8] float32, row c = decode(c) (read-only)."""
    points = decode(np.arange(N_CODES, dtype=np.uint16), variant)  # [65536, 8]
    return _read_only(points)


def _check_vectors(x, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 1 or x.shape[-1] != DIM:
        raise UserError(f"{what}: input must have a last axis of {DIM}, got shape {list(x.shape)}; "
                        f"reshape the weights into groups of {DIM}")
    if not np.isfinite(x).all():
        raise UserError(f"{what}: input has NaN or infinite values; check the weights being quantized")
    return x


def encode(x, variant: str = DEFAULT_VARIANT) -> np.ndarray:
    """x [..., 8] float32 -> uint16 codes [...] of the nearest E8P points (exact; ties broken arbitrarily): for
    each shift ±¼ and source vector, the signs of the shifted x with the parity rule, the cheapest coordinate
    flipped where it breaks it (runtime/kernels/e8p_encode_numba.py)."""
    x = _check_vectors(x, "E8P encode")
    check_variant(variant)
    codes = encode_rows(x.reshape(-1, DIM), source_codebook(variant), source_parity(variant))  # [n]
    return codes.reshape(x.shape[:-1])


@functools.lru_cache(maxsize=None)
def e8_1bit_codebook(variant: str = DEFAULT_VARIANT) -> np.ndarray:
    """[256, 8] float32 points of E8 (read-only): the origin, the 240 roots (|x|² = 2) and
    15 of the 16 points ±2 e_i (|x|² = 4); sorted by norm then lexicographically, and
    one of the 16 left out: +2 e_0 (the last in that order) in "lexicographic", -2 e_7 in "quip-sharp".
    """
    check_variant(variant)
    small = np.array(list(itertools.product((-2, 0, 2), repeat=DIM)), dtype=np.int64)  # [3^8, 8] 2x, x in {-1,0,1}^8
    half = np.array(list(itertools.product((-1, 1), repeat=DIM)), dtype=np.int64)  # [256, 8] 2x, x in {±½}^8
    axis = np.concatenate([4 * np.eye(DIM, dtype=np.int64), -4 * np.eye(DIM, dtype=np.int64)])  # [16, 8] 2x, ±2 e_i
    doubled = np.concatenate([small, half])  # [3^8 + 256, 8]
    in_e8 = doubled.sum(axis=1) % 4 == 0  # Σ x even (both cosets)
    roots = doubled[in_e8 & ((doubled ** 2).sum(axis=1) <= 8)]  # [241, 8] |x|² <= 2
    left_out = 4 * np.eye(DIM, dtype=np.int64)[0] if variant == "lexicographic" else -4 * np.eye(DIM, dtype=np.int64)[-1]
    axis = axis[(axis != left_out).any(axis=1)]  # [15, 8]
    axis = axis[np.lexsort(axis.T[::-1])]
    roots = roots[np.lexsort(np.vstack([roots.T[::-1], (roots ** 2).sum(axis=1)]))]
    points = np.concatenate([roots, axis])  # [256, 8]
    table = (points / 2).astype(np.float32)  # [256, 8]
    return _read_only(table)


def e8_1bit_decode(codes, variant: str = DEFAULT_VARIANT) -> np.ndarray:
    """uint8 codes [...] -> float32 points [..., 8] of `e8_1bit_codebook`."""
    return e8_1bit_codebook(variant)[_checked_codes(codes, np.uint8, "E8 1-bit decode")]


def e8_1bit_encode(x, variant: str = DEFAULT_VARIANT) -> np.ndarray:
    """x [..., 8] float32 -> uint8 codes [...] of the nearest of the 256 points (brute force)."""
    x = _check_vectors(x, "E8 1-bit encode")
    table = e8_1bit_codebook(variant)  # [256, 8]
    norm2 = (table ** 2).sum(axis=1)  # [256]
    rows = x.reshape(-1, DIM)  # [n, 8]
    codes = np.empty(len(rows), dtype=np.uint8)  # [n]
    for start in range(0, len(rows), ENCODE_CHUNK):
        chunk = rows[start:start + ENCODE_CHUNK]  # [c, 8]
        codes[start:start + ENCODE_CHUNK] = (norm2[None, :] - 2.0 * chunk @ table.T).argmin(axis=1)
    return codes.reshape(x.shape[:-1])


@dataclass(frozen=True)
class Stage:
    """One RVQ stage: its codebook's encode / decode, the dtype of its codes, its scale for unit-RMS data."""

    name: str
    encode: Callable
    decode: Callable
    code_dtype: type
    scale: float


def check_bits(bits: int) -> None:
    """UserError unless bits is 2, 3 or 4."""
    if bits not in BITS:
        raise UserError(f"E8P: bits must be one of {BITS} (2: E8P, 3: E8P + 1-bit E8, 4: E8P + E8P), got {bits}")


def stage_codebooks(bits: int, variant: str = DEFAULT_VARIANT) -> list[Stage]:
    """The RVQ stages for 2, 3 or 4 bits per weight in a codebook variant, first stage first."""
    check_bits(bits)
    check_variant(variant)
    e8p = functools.partial(Stage, "e8p", functools.partial(encode, variant=variant),
                            functools.partial(decode, variant=variant), np.uint16)
    second = {3: functools.partial(Stage, "e8_1bit", functools.partial(e8_1bit_encode, variant=variant),
                                   functools.partial(e8_1bit_decode, variant=variant), np.uint8),
              4: e8p}
    scales = STAGE_SCALES[bits]
    stages = [e8p(scales[0])]
    if bits in second:
        stages.append(second[bits](scales[1]))
    return stages


def stage_scales(bits: int, rms: float = 1.0) -> list[float]:
    """The scale of each stage for data of root mean square `rms`."""
    return [rms * stage.scale for stage in stage_codebooks(bits)]


def rvq_encode(x, bits: int, rms: float = 1.0) -> list[np.ndarray]:
    """x [..., 8] -> one code array [...] per stage (uint16 for E8P, uint8 for 1-bit E8).

    Stage k quantizes the residual r_k = x - Σ_{i<k} scale_i · decode_i(code_i)
    as code_k = encode_k(r_k / scale_k), with scale_k = stage_scales(bits, rms)[k].
    """
    x = _check_vectors(x, "E8P rvq_encode")
    residual = x
    codes = []
    for stage, scale in zip(stage_codebooks(bits), stage_scales(bits, rms)):
        code = stage.encode(residual * np.float32(1.0 / scale))  # [...]
        residual = residual - np.float32(scale) * stage.decode(code)  # [..., 8]
        codes.append(code)
    return codes


def rvq_decode(codes: list, bits: int, rms: float = 1.0) -> np.ndarray:
    """Σ_k scale_k · decode_k(codes[k]) [..., 8] float32 (the inverse of `rvq_encode` up to the error)."""
    stages = stage_codebooks(bits)
    if len(codes) != len(stages):
        raise UserError(f"E8P rvq_decode: {bits} bits needs {len(stages)} code arrays, got {len(codes)}")
    out = None
    for stage, scale, code in zip(stages, stage_scales(bits, rms), codes):
        part = np.float32(scale) * stage.decode(code)  # [..., 8]
        out = part if out is None else out + part
    return out
