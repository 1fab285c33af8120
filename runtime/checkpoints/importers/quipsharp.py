"""Import QuIP# checkpoints of the quip-sharp project (hfize_llama.py output) into the `e8p` format.

QuIP# (Tseng et al. 2024) stores each linear, or each fused group of linears
(`self_attn.qkv_proj` = q, k, v; `mlp.upgate_proj` = up, gate), as

    <m>.Qidxs        int64  [out, in/32] (2 bits; 3 bits: [out, 3 in/64]; 4 bits: [out, in/16])
    <m>.SU  [in], <m>.SV [out]   input / output scale vectors (random signs, real-valued after fine-tuning)
    <m>.Wscale       scalar (absent in the 4-bit layout)      <m>.fuse_scales  [parts] (fused modules)

    W = diag(SV) · H_out · Ŵ · H_inᵀ · diag(SU)        Ŵ = Wscale · (E8P(c1) + stage2(c2) / resid_scale)

(lib/linear/quantized_linear.py, lib/codebook/latticee8_padded12*.py:
input x·SU, matmul_hadUt, codes, ·Wscale, matmul_hadU, ·SV), with H = hadK ⊗
Sylvester / sqrt(n) (lib/utils/matmul_had.py). Each fused part's rows are
multiplied by its fuse_scale. resid_scale is 2.04 (3 bits) or 3.45 (4 bits)
unless `resid_scale_override` says otherwise.

What differs from runtime/e8p_codebook.py and how it is mapped:

- Hadamard factors: quip-sharp's had12 and had20 are the transposes of this
  project's Paley factors, so H_quip = Hᵀ_ours and the product above is the
  e8p format's diag(s_out) Hₒᵀ Ŵ Hᵢ diag(s_in) exactly. Sizes whose factor
  K differs (or is not 1, 12, 20) are refused.
- E8P codes (codebook_version 1): a code c holds the source index c >> 8
  into quip-sharp's 256 absolute vectors (the 227 of norm <= 10 in
  lexicographic order, then its own 29 of norm 12: the "quip-sharp"
  variant of runtime/e8p_codebook.py, whose other variant has another 29)
  and 8 sign bits; the parity p of the sign byte selects the shift (-1/4
  if odd), bit 0 is flipped by p, coordinate i takes sign bit SHUFFLE[i],
  and coordinate 7 is negated when the source vector's sum is odd
  (get_full_grid). Every code is decoded to its point and encoded again in
  this project's code layout in the "quip-sharp" variant, where every
  point exists: the import is exact.
- 3-bit second stage (1-bit E8, get_e81bgrid): the origin, the 240 roots and
  ±2e_i without -2e_7, the "quip-sharp" variant's 1-bit codebook in another
  order; each code maps to its point's index there.
- Packing (maybe_pack_idxs): 2 rows x 2 codes share one int64 (four source
  bytes low, the four sign bytes interleaved nibble-wise high), in tiles of
  16 rows x 8 codes; the 1-bit E8 codes are one byte each, 8 per int64.
- SU, SV may be real: their signs go into the format, their magnitudes
  (and fuse scales) into `QuipSharpLinear`, which also serves the rows of
  a fused product to each of its parts (computed once per input).

Refused: codebook_version 0 files, other codebooks, lora_rank > 0,
rescale_WH and outlier_channel_split.
"""
from __future__ import annotations

import functools
import itertools

import numpy as np

from runtime import e8p_codebook
from runtime.device import to_numpy
from runtime.errors import UserError
from runtime.formats.base import PackedTensor
from runtime.formats.e8p import E8PTensor
from runtime.hadamard import hadamard_factor
from runtime.checkpoints.importers import require_shape, setting, take_module

CODEBOOKS = {"E8P12": 2, "E8P12RVQ3B": 3, "E8P12RVQ4B": 4}
RESID_SCALES = {3: 2.04, 4: 3.45}
SHUFFLE = (0, 4, 1, 5, 2, 6, 3, 7)  # coordinate i takes sign bit SHUFFLE[i]
VARIANT = "quip-sharp"  # the codebook variant of runtime/e8p_codebook.py whose points these checkpoints use
QUIP_K = (172, 156, 140, 108, 60, 52, 36, 28, 20, 12)  # get_hadK's order
VERIFIED_K = (1, 12, 20)  # factors checked equal (transposed) to runtime.hadamard's


@functools.lru_cache(maxsize=None)
def quip_e8p_points() -> np.ndarray:
    """[65536, 8] float32: the point of every codebook_version 1 E8P code (get_full_grid, read-only)."""
    codes = np.arange(1 << 16)
    source = e8p_codebook.source_codebook(VARIANT)[codes >> 8]  # [65536, 8] (get_abs_grid order)
    odd_sum = source.sum(axis=1).astype(np.int64) % 2  # [65536]
    source[:, 7] *= 1 - 2 * odd_sum
    signs = codes & 255
    parity = np.zeros_like(signs)
    for bit in range(8):
        parity ^= (signs >> bit) & 1
    signs = signs ^ parity
    negative = (signs[:, None] >> np.array(SHUFFLE)) & 1  # [65536, 8]
    points = source * (1 - 2 * negative) + np.where(parity, -0.25, 0.25)[:, None]
    points = points.astype(np.float32)
    points.setflags(write=False)
    return points


@functools.lru_cache(maxsize=None)
def quip_e81b_points() -> np.ndarray:
    """[256, 8] float32: quip-sharp's 1-bit E8 codebook (get_e81bgrid order, read-only)."""
    integer = [p for p in itertools.product((-1, 0, 1), repeat=8) if sum(p) % 2 == 0 and sum(map(abs, p)) <= 2]
    half = [p for p in itertools.product((-0.5, 0.5), repeat=8) if sum(p) % 2 == 0]
    axis = [tuple(2 * s * (i == k) for i in range(8)) for s in (1, -1) for k in range(8)][:15]
    points = np.array(integer + half + axis, dtype=np.float32)  # [256, 8]
    points.setflags(write=False)
    return points


@functools.lru_cache(maxsize=None)
def e8p_code_map() -> np.ndarray:
    """[65536] uint16: our code (in the "quip-sharp" variant) of every quip-sharp E8P code's point."""
    return e8p_codebook.encode(quip_e8p_points(), VARIANT)  # [65536]


@functools.lru_cache(maxsize=None)
def e81b_code_map() -> np.ndarray:
    """[256] uint8: our 1-bit E8 code (in the "quip-sharp" variant) of every quip-sharp 1-bit E8 code's point."""
    return e8p_codebook.e8_1bit_encode(quip_e81b_points(), VARIANT)  # [256]


def unpack_e8p(packed: np.ndarray, rows: int, groups: int) -> np.ndarray:
    """int64 [rows, groups/4] (maybe_pack_idxs) -> quip-sharp E8P codes uint16 [rows, groups]."""
    tiles = packed.reshape(rows // 16, groups // 8, 8, 4).transpose(0, 2, 1, 3)  # [rows/16, 8, groups/8, 4]
    words = np.ascontiguousarray(tiles).reshape(rows // 2, groups // 2).view(np.uint64)  # [rows/2, groups/2]
    codes = np.empty((rows // 2, 2, groups // 2, 2), dtype=np.uint16)  # [row pair, row, code pair, code]
    for t in range(4):  # t = row-in-pair + 2 * code-in-pair
        source = (words >> np.uint64(8 * t)) & np.uint64(255)
        sign = np.zeros_like(words)
        for bit in range(8):
            sign |= ((words >> np.uint64(32 + 4 * bit + t)) & np.uint64(1)) << np.uint64(bit)
        codes[:, t % 2, :, t // 2] = (source << np.uint64(8)) | sign
    return codes.reshape(rows, groups)


def check_size(n: int, prefix: str, source: str) -> None:
    """UserError unless quip-sharp's Hadamard factor of size n is this project's (and verified equal)."""
    theirs = next((k for k in QUIP_K if n % k == 0), 1)
    if theirs != hadamard_factor(n)[0] or theirs not in VERIFIED_K:
        raise UserError(f"{source}: {prefix} has size {n}, whose Hadamard factor in quip-sharp ({theirs}) is not "
                        f"one this runtime shares (sizes K * 2**p with K in {VERIFIED_K})")


class FusedProduct:
    """One E8P product shared by the parts of a fused module: y = inner(x ⊙ in_scale), computed once per x."""

    def __init__(self, inner: E8PTensor, in_scale):
        self.inner = inner  # E8PTensor [out_total, in]
        self.in_scale = in_scale  # [in] float32 magnitudes of SU, or None when all are 1
        self.last = None  # (copy of x, y) of the latest product

    def product(self, x):
        """y [..., out_total] = inner.matmul(x ⊙ in_scale), reusing the last result for an equal x."""
        if self.last is not None and self.last[0].shape == x.shape and (self.last[0] == x).all():
            return self.last[1]
        y = self.inner.matmul(x if self.in_scale is None else x * self.in_scale)
        self.last = (x.copy(), y)
        return y


class QuipSharpLinear(PackedTensor):
    """Rows [start, stop) of a (fused) QuIP# product, times out_scale: W = diag(out_scale) W_e8p[rows] diag(in)."""

    FORMAT = "quipsharp-import"

    def __init__(self, shared: FusedProduct, start: int, stop: int, out_scale):
        self.shared = shared
        self.start, self.stop = int(start), int(stop)
        self.out_scale = out_scale  # [stop - start] float32 (|SV| times the fuse scale)
        self.qweight = shared.inner.qweight  # codes live in the shared E8P tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.stop - self.start, self.shared.inner.shape[1]

    def dequantize(self):
        """W [rows, in] float32 (NumPy)."""
        w = self.shared.inner.dequantize()[self.start:self.stop]  # [rows, in]
        if self.shared.in_scale is not None:
            w = w * to_numpy(self.shared.in_scale)
        return w * to_numpy(self.out_scale)[:, None]

    def matmul_rows(self, x, on_gpu: bool):
        """y [m, rows] = the shared product's rows, scaled."""
        return self.shared.product(x)[:, self.start:self.stop] * self.out_scale

    def tensors(self) -> dict:
        arrays = dict(self.shared.inner.tensors(), out_scale=self.out_scale)
        if self.shared.in_scale is not None:
            arrays["in_scale"] = self.shared.in_scale
        return arrays

    def meta(self) -> dict:
        return {"rows": [self.start, self.stop], **self.shared.inner.meta()}

    def to_device(self, xp) -> "QuipSharpLinear":
        in_scale = None if self.shared.in_scale is None else xp.asarray(self.shared.in_scale)
        shared = FusedProduct(self.shared.inner.to_device(xp), in_scale)
        return QuipSharpLinear(shared, self.start, self.stop, xp.asarray(self.out_scale))


def read_settings(settings: dict, source: str) -> tuple[int, float]:
    """(bits, resid_scale) from quip_params; UserError for what cannot be imported."""
    codebook = setting(settings, "codebook", str, tuple(CODEBOOKS), None, source)
    setting(settings, "codebook_version", int, (1,), 0, source)
    setting(settings, "codesz", int, (8,), 8, source)
    setting(settings, "lora_rank", int, (0, -1), 0, source)
    setting(settings, "rescale_WH", bool, (False,), False, source)
    setting(settings, "outlier_channel_split", bool, (False,), False, source)
    bits = CODEBOOKS[codebook]
    override = setting(settings, "resid_scale_override", (int, float), None, -1, source)
    return bits, float(override) if override > 0 else RESID_SCALES.get(bits, 1.0)


def stage_codes(qidxs: np.ndarray, bits: int, rows: int, n_in: int) -> list:
    """Our code arrays [rows, in/8] (one per RVQ stage, "quip-sharp" variant) for a module's Qidxs."""
    groups = n_in // 8
    split = {2: (groups // 4,), 3: (groups // 4, groups // 8), 4: (groups // 4, groups // 4)}[bits]
    parts = np.split(np.ascontiguousarray(qidxs), np.cumsum(split)[:-1], axis=1)
    out = []
    for index, part in enumerate(parts):
        if bits == 3 and index == 1:
            theirs = np.ascontiguousarray(part).view(np.uint8).reshape(rows, groups)  # [rows, in/8]
            out.append(e81b_code_map()[theirs])
        else:
            out.append(e8p_code_map()[unpack_e8p(part, rows, groups)])
    return out


def convert_module(arrays: dict, bits: int, resid_scale: float, prefix: str,
                   source: str) -> tuple[FusedProduct, np.ndarray]:
    """A QuIP# module's arrays -> (the shared product: E8PTensor with the signs and |SU| beside it, |SV| [out])."""
    su, sv = np.asarray(arrays["SU"], dtype=np.float32), np.asarray(arrays["SV"], dtype=np.float32)
    if su.ndim != 1 or sv.ndim != 1:
        raise UserError(f"{source}: {prefix}.SU / SV must be vectors, got shapes {list(su.shape)} / {list(sv.shape)}")
    n_in, rows = su.shape[0], sv.shape[0]
    if n_in % 64 or rows % 16:
        raise UserError(f"{source}: {prefix} is {rows} x {n_in}; QuIP#'s packing needs rows in multiples of 16 and "
                        f"inputs in multiples of 64")
    check_size(n_in, prefix, source)
    check_size(rows, prefix, source)
    width = {2: n_in // 32, 3: 3 * n_in // 64, 4: n_in // 16}[bits]
    qidxs = require_shape(arrays["Qidxs"], (rows, width), np.int64, prefix + ".Qidxs", source)
    wscale = float(np.asarray(arrays.get("Wscale", 1.0), dtype=np.float32).reshape(-1)[0])
    scales = [wscale] + ([wscale / resid_scale] if bits > 2 else [])
    codes = stage_codes(qidxs, bits, rows, n_in)
    inner = E8PTensor.from_codes(codes, scales, np.where(su < 0, -1, 1), np.where(sv < 0, -1, 1), bits,
                                 (rows, n_in), codebook=VARIANT)
    magnitude = np.abs(su).astype(np.float32)  # [in]
    return FusedProduct(inner, None if (magnitude == 1).all() else magnitude), np.abs(sv).astype(np.float32)


def fused_parts(prefix: str, config: dict) -> list[tuple[str, int]]:
    """[(HF module name, rows)] of the linears a (possibly fused) quip-sharp module holds."""
    base, _, name = prefix.rpartition(".")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = hidden // heads
    kv = config.get("num_key_value_heads") or heads
    ffn = config.get("intermediate_size")
    if name == "qkv_proj":
        return [(f"{base}.q_proj", heads * head_dim), (f"{base}.k_proj", kv * head_dim),
                (f"{base}.v_proj", kv * head_dim)]
    if name == "upgate_proj":
        return [(f"{base}.up_proj", ffn), (f"{base}.gate_proj", ffn)]
    return [(prefix, None)]


def convert(config: dict, settings: dict, tensors: dict, source: str) -> dict:
    """{HF name: array or packed tensor} of a quip-sharp checkpoint's tensors."""
    bits, resid_scale = read_settings(settings, source)
    out = dict(tensors)
    modules = sorted(name[:-len(".Qidxs")] for name in out if name.endswith(".Qidxs"))
    if not modules:
        raise UserError(f"{source}: the config has quip_params but no tensor ends in .Qidxs; re-download the model")
    for prefix in modules:
        arrays = take_module(out, prefix, ("Qidxs", "SU", "SV"), source,
                             optional=("Wscale", "fuse_scales", "codebook_id"))
        shared, out_magnitude = convert_module(arrays, bits, resid_scale, prefix, source)
        parts = fused_parts(prefix, config)
        fuse = np.asarray(arrays.get("fuse_scales", np.ones(len(parts))), dtype=np.float32).reshape(-1)
        total = shared.inner.shape[0]
        sizes = [rows if rows is not None else total for _, rows in parts]
        if sum(sizes) != total or fuse.shape[0] != len(parts):
            raise UserError(f"{source}: {prefix} has {total} rows and {fuse.shape[0]} fuse scales, but the config "
                            f"implies parts of {sizes} rows; the checkpoint does not match its config")
        start = 0
        for (name, _), rows, scale in zip(parts, sizes, fuse):
            out_scale = out_magnitude[start:start + rows] * scale  # [rows]
            whole = len(parts) == 1 and shared.in_scale is None and (out_scale == 1).all()
            out[name + ".weight"] = shared.inner if whole else QuipSharpLinear(shared, start, start + rows, out_scale)
            start += rows
    return out
