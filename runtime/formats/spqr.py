"""The `spqr` format: small-group base codes with quantized statistics, plus float16 outliers.

The storage of SpQR weights (Dettmers et al. 2023, "SpQR: A Sparse-Quantized
Representation for Near-Lossless LLM Weight Compression", §3.2 bilevel
quantization, §4.2 storage). A weight is a dense part plus a sparse part:

    dense   W_d[n, perm[k]] = (code[k, n] - z[g, n]) * s[g, n]       g = k // group_size
    stats   s[g, n] = s_low[g, b] + s_code[g, n] * s_step[g, b]     b = n // stat_group
            z[g, n] = z_low[g, b] + z_code[g, n] * z_step[g, b]     (float32 arithmetic)
    W       W_d, except at the outliers, where W[o, c] = the outlier's float16 value

for output n, storage position k (input column perm[k]). The outliers
REPLACE the dense value at their position: the dense code stored there is
the code nearest 0 and counts for nothing. The kernels add, for each outlier,
x[c] * (value - W_d[o, c]) (`corrections`, float32, derived when the tensor
is built, not stored), so `dequantize` reproduces every outlier exactly; the
int8-activation decode kernel adds them in the task that computes their
outputs (runtime/kernels/uniform_int8_numba.py), the other paths after the
dense product (runtime/kernels/sparse_numba.py).

Arrays (in / out = input / output features, b = bits in {2, 3, 4},
sb = stat_bits, n_groups = ceil(in / group_size), n_blocks = ceil(out / stat_group)):

    qweight      int32   [ceil(in/32) * b, out]      base codes in storage order, packed along the
                                                     input dimension exactly as the uniform format's
                                                     qweight (runs of 32 codes, lowest bits first)
    perm         int32   [in]                        storage position k holds input column perm[k]
    scale_codes  int32   [n_groups, ceil(out/32)*sb] s_code packed along outputs as uniform's qzeros
    scale_step   float16 [n_groups, n_blocks]
    scale_low    float16 [n_groups, n_blocks]
    zero_codes   int32   [n_groups, ceil(out/32)*sb] z_code, likewise
    zero_step    float16 [n_groups, n_blocks]
    zero_low     float16 [n_groups, n_blocks]
    outlier_values / outlier_col_idx / outlier_row_ptr: a SparseTensor (runtime/formats/sparse.py)

With stat_bits = 16 the statistics are not quantized: `scales` and `zeros`
float16 [n_groups, out] replace the six statistic arrays (s = scales, z = zeros).

Bit order of one run of 32 base codes for 3 bits (b words, one bit stream,
code k at stream bits [3k, 3k + 3), stream bit p = bit p % 32 of word p // 32):

    word 0:  bits 0-29 codes 0-9        bits 30-31 code 10 (its bits 0-1)
    word 1:  bit  0    code 10 (bit 2)  bits 1-30 codes 11-20   bit 31 code 21 (bit 0)
    word 2:  bits 0-1  code 21 (bits 1-2)         bits 2-31 codes 22-31

Groups are multiples of 16 positions, so every half run (16 codes, 16 b bits,
at most 64) lies in one group: the kernels read a half run as one 64-bit value.

Bits per weight, from the stored bytes (32 | in, 32 | out, G | in, SG | out):

    b + 2 sb / G + 64 / (G * SG) + 32 / out + 32 (out + 1) / (in * out) + 32 * nnz / (in * out)
      codes  stats   2nd level      perm      row_ptr                    outliers (value + column)

e.g. b = 3, G = SG = 16, sb = 3, out = 1536, in = 576: 3.702 + 32 * outlier fraction.
"""
from __future__ import annotations

import numpy as np

from runtime.device import array_module_of, is_cupy, to_module, to_numpy
from runtime.errors import UserError
from runtime.formats.base import PackedTensor, activation_mode, frozen, quantize_activation
from runtime.kernels.quant_activations_numba import LEVELS16
from runtime.formats.sparse import SparseTensor
from runtime.formats.uniform import RUN, pack, unpack
from runtime.quant_grid import fp16_ceil

BITS = (2, 3, 4)
HALF_RUN = 16  # group sizes are multiples of this
STAT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)  # 16: statistics kept as float16
FP16_STATS = 16
QUANTIZED_STATS = ("scale_codes", "scale_step", "scale_low", "zero_codes", "zero_step", "zero_low")  # kernel order
OUTLIER_PREFIX = "outlier_"


def check_params(bits: int, group_size: int, stat_bits: int, stat_group: int) -> None:
    """UserError unless the parameters are ones the format stores."""
    if bits not in BITS:
        raise UserError(f"spqr: bits must be one of {BITS}, got {bits}")
    if group_size <= 0 or group_size % HALF_RUN:
        raise UserError(f"spqr: group_size must be a positive multiple of {HALF_RUN} (16, 32, 64, ...), "
                        f"got {group_size}")
    if stat_bits not in STAT_BITS:
        raise UserError(f"spqr: stat_bits must be one of {STAT_BITS} (16: float16 statistics), got {stat_bits}")
    if stat_group < 1:
        raise UserError(f"spqr: stat_group must be a positive number of output rows, got {stat_group}")


def quantize_stats(values: np.ndarray, stat_bits: int, stat_group: int):
    """Min-max `stat_bits`-bit quantization of statistics values [..., rows] in blocks of stat_group rows
    (§3.2): (codes uint8 [..., rows], step float16 [..., n_blocks], low float16 [..., n_blocks]).

    low is the block minimum and step (max - low) / (2**stat_bits - 1), both rounded UP to float16
    (so a positive statistic stays positive); codes = clip(round((v - low) / step)).
    """
    values = np.asarray(values, dtype=np.float32)  # [..., rows]
    rows = values.shape[-1]
    n_blocks = -(-rows // stat_group)
    pad = [(0, 0)] * (values.ndim - 1) + [(0, n_blocks * stat_group - rows)]
    blocks = np.pad(values, pad, mode="edge").reshape(*values.shape[:-1], n_blocks, stat_group)  # [..., nb, SG]
    maxq = (1 << stat_bits) - 1
    low = fp16_ceil(blocks.min(axis=-1))  # [..., n_blocks]
    step = fp16_ceil(np.maximum(blocks.max(axis=-1) - low, 0) / np.float32(maxq))  # [..., n_blocks]
    safe = np.where(step > 0, step, 1)[..., None]  # [..., n_blocks, 1]
    codes = np.clip(np.rint((blocks - low[..., None]) / safe), 0, maxq).astype(np.uint8)  # [..., nb, SG]
    codes = codes.reshape(*values.shape[:-1], n_blocks * stat_group)[..., :rows]  # [..., rows]
    return codes, step.astype(np.float16), low.astype(np.float16)


def dequantize_stats(codes: np.ndarray, step: np.ndarray, low: np.ndarray, stat_group: int) -> np.ndarray:
    """Statistics float32 [..., rows] = low + code * step of each row's block (the format's definition)."""
    block = np.arange(codes.shape[-1]) // stat_group  # [rows]
    return (low.astype(np.float32)[..., block] + codes.astype(np.float32) * step.astype(np.float32)[..., block])


class SpQRTensor(PackedTensor):
    """W [out, in] as SpQR's base codes, bilevel statistics and float16 outliers (layout above)."""

    FORMAT = "spqr"

    def __init__(self, qweight, perm, stats: dict, outliers: SparseTensor, *, bits: int, group_size: int,
                 stat_bits: int, stat_group: int):
        """Wrap packed arrays (NumPy, or CuPy via `to_device`); stats holds the statistic arrays named
        above. UserError when they do not fit together."""
        check_params(bits, group_size, stat_bits, stat_group)
        self.bits, self.group_size = int(bits), int(group_size)
        self.stat_bits, self.stat_group = int(stat_bits), int(stat_group)
        self.qweight = frozen(qweight)  # [ceil(in/32)*bits, out] int32
        self.perm = frozen(perm)  # [in] int32
        self.stats = {name: frozen(a) for name, a in stats.items()}
        self.outliers = outliers
        self.in_features = int(np.shape(perm)[0]) if np.ndim(perm) == 1 else -1
        self.out_features = int(np.shape(qweight)[1]) if np.ndim(qweight) == 2 else -1
        self._check()
        self.corrections = self._corrections()  # [nnz] float32 outlier value - dense value (derived)
        self._int8_weight = None  # the int8 decode kernel's view, made on first use

    @classmethod
    def from_codes(cls, codes, perm, scales, zeros, outliers: SparseTensor, *, bits: int, group_size: int,
                   stat_bits: int, stat_group: int) -> "SpQRTensor":
        """Pack codes uint8 [out, in] (ORIGINAL column order), perm [in] and the statistics: with
        stat_bits 16, scales / zeros float [n_groups, out] (rounded to float16); else each a tuple
        (codes [n_groups, out], step [n_groups, n_blocks], low [n_groups, n_blocks]) of `quantize_stats`."""
        check_params(bits, group_size, stat_bits, stat_group)
        perm = np.asarray(perm, dtype=np.int32)  # [in]
        codes = np.asarray(codes)  # [out, in]
        if codes.size and int(codes.max()) >= 1 << bits:
            raise UserError(f"spqr: codes must lie in [0, {(1 << bits) - 1}] for {bits} bits")
        qweight = pack(np.ascontiguousarray(codes.T[perm]), bits)  # [ceil(in/32)*bits, out]
        if stat_bits == FP16_STATS:
            stats = {"scales": np.asarray(scales, dtype=np.float16), "zeros": np.asarray(zeros, dtype=np.float16)}
        else:
            stats = {}
            for name, (stat_codes, step, low) in (("scale", scales), ("zero", zeros)):
                stats[f"{name}_codes"] = np.ascontiguousarray(pack(np.ascontiguousarray(stat_codes.T), stat_bits).T)
                stats[f"{name}_step"] = np.asarray(step, dtype=np.float16)
                stats[f"{name}_low"] = np.asarray(low, dtype=np.float16)
        return cls(qweight, perm, stats, outliers, bits=bits, group_size=group_size, stat_bits=stat_bits,
                   stat_group=stat_group)

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.group_size)

    def _expected(self) -> dict:
        """name -> (dtype, shape) every dense-part array must have, from the parameters."""
        n_in, n_out, n_groups = self.in_features, self.out_features, self.n_groups
        expected = {"qweight": (np.int32, (-(-n_in // RUN) * self.bits, n_out)), "perm": (np.int32, (n_in,))}
        if self.stat_bits == FP16_STATS:
            expected.update(scales=(np.float16, (n_groups, n_out)), zeros=(np.float16, (n_groups, n_out)))
            return expected
        n_blocks = -(-n_out // self.stat_group)
        for name in ("scale", "zero"):
            expected[f"{name}_codes"] = (np.int32, (n_groups, -(-n_out // RUN) * self.stat_bits))
            expected[f"{name}_step"] = (np.float16, (n_groups, n_blocks))
            expected[f"{name}_low"] = (np.float16, (n_groups, n_blocks))
        return expected

    def _check(self):
        """Shapes and dtypes against the parameters; on NumPy arrays also perm and the statistics' values."""
        if self.in_features <= 0 or self.out_features <= 0:
            raise UserError("packed spqr tensor: perm must be 1-D and qweight 2-D; re-quantize the model")
        arrays = {"qweight": self.qweight, "perm": self.perm, **self.stats}
        expected = self._expected()
        if set(arrays) != set(expected):
            raise UserError(f"packed spqr tensor arrays {sorted(arrays)} do not match stat_bits={self.stat_bits} "
                            f"(needs {sorted(expected)}); re-quantize the model")
        for name, (dtype, shape) in expected.items():
            a = arrays[name]
            if a.dtype != dtype or tuple(a.shape) != shape:
                raise UserError(f"packed spqr tensor {name} does not match its metadata: expected "
                                f"{np.dtype(dtype).name} {list(shape)}, got {a.dtype} {list(a.shape)}; "
                                f"re-quantize the model")
        if self.outliers.shape != self.shape:
            raise UserError(f"packed spqr tensor: outliers of shape {list(self.outliers.shape)} for a weight "
                            f"{list(self.shape)}; re-quantize the model")
        if is_cupy(self.qweight):
            return
        if not np.array_equal(np.sort(self.perm), np.arange(self.in_features)):
            raise UserError("packed spqr tensor: perm is not a permutation of the input columns; re-quantize the model")
        if not all(np.isfinite(a).all() for a in self.stats.values() if a.dtype == np.float16):
            raise UserError("packed spqr tensor: statistics are not all finite; re-quantize the model")

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(s, z) float32 [n_groups, out]: the decoded scale and zero of every group and output."""
        stats = {name: to_numpy(a) for name, a in self.stats.items()}
        if self.stat_bits == FP16_STATS:
            return stats["scales"].astype(np.float32), stats["zeros"].astype(np.float32)
        decoded = [dequantize_stats(self.stat_codes(name), stats[f"{name}_step"], stats[f"{name}_low"],
                                    self.stat_group) for name in ("scale", "zero")]
        return decoded[0], decoded[1]

    def stat_codes(self, name: str) -> np.ndarray:
        """The quantized statistic `name` ("scale" or "zero") unpacked: codes uint8 [n_groups, out]."""
        words = to_numpy(self.stats[f"{name}_codes"])  # [n_groups, ceil(out/32) * stat_bits]
        return unpack(np.ascontiguousarray(words.T), self.stat_bits, self.out_features).T

    def dequantize_dense(self) -> np.ndarray:
        """W_d [out, in] float32, the dense part alone, in original column order."""
        s, z = self.statistics()  # [n_groups, out] each
        codes = unpack(to_numpy(self.qweight), self.bits, self.in_features).astype(np.float32)  # [in, out] storage
        groups = np.arange(self.in_features) // self.group_size  # [in] group of each storage position
        w = np.empty(self.shape, dtype=np.float32)  # [out, in]
        w[:, to_numpy(self.perm)] = ((codes - z[groups]) * s[groups]).T
        return w

    def dequantize(self) -> np.ndarray:
        """W [out, in] float32: the dense part with the outliers in place (the NumPy reference)."""
        w = self.dequantize_dense()  # [out, in]
        w[self.outliers.rows(), to_numpy(self.outliers.col_idx)] = to_numpy(self.outliers.values)
        return w

    def _corrections(self):
        """outlier value - dense value at each outlier, float32 [nnz], on the tensor's device."""
        rows = self.outliers.rows()  # [nnz]
        cols = to_numpy(self.outliers.col_idx).astype(np.int64)  # [nnz]
        positions = np.argsort(to_numpy(self.perm))[cols]  # [nnz] storage position of each outlier
        words = to_numpy(self.qweight).view(np.uint32)  # [ceil(in/32)*bits, out]
        bit = positions % RUN * self.bits  # [nnz]
        word = positions // RUN * self.bits + bit // 32  # [nnz]
        offset = (bit % 32).astype(np.uint64)  # [nnz]
        code = words[word, rows].astype(np.uint64) >> offset  # [nnz]
        spill = bit % 32 + self.bits > 32  # [nnz] codes that straddle two words
        code[spill] |= words[word[spill] + 1, rows[spill]].astype(np.uint64) << (np.uint64(32) - offset[spill])
        code = (code & np.uint64((1 << self.bits) - 1)).astype(np.float32)  # [nnz]
        s, z = self.statistics()  # [n_groups, out]
        groups = positions // self.group_size  # [nnz]
        dense = (code - z[groups, rows]) * s[groups, rows]  # [nnz]
        corrections = to_numpy(self.outliers.values).astype(np.float32) - dense  # [nnz]
        return array_module_of(self.qweight).asarray(corrections)

    def matmul_reference(self, x) -> np.ndarray:
        """y [..., out] = x [..., in] @ W.T through the NumPy reference."""
        return x @ self.dequantize().T

    def matmul_reference_int8(self, x, levels: int = LEVELS16) -> np.ndarray:
        """y [m, out] for x [m, in], the reference of the int8-activation decode path: the dense part times x
        quantized as the integer kernels do (in storage order, `quantize_activation`; two-byte activations,
        LEVELS16, in decode and prefill alike), the outliers' corrections (W - W_d, zero elsewhere) times x."""
        x = np.asarray(x, dtype=np.float32)
        dense = self.dequantize_dense()  # [out, in]
        return quantize_activation(x, to_numpy(self.perm), levels) @ dense.T + x @ (self.dequantize() - dense).T

    def int8_codes(self):
        """(bits, no table) on the CPU for groups of whole runs of 32 or of one half run (16: the kernels'
        HALF_RUN_GROUPS) (PackedTensor.int8_codes)."""
        tiles_take = self.group_size == HALF_RUN or self.group_size % RUN == 0
        return None if is_cupy(self.qweight) or not tiles_take else (self.bits, False)

    def int8_weight(self):
        """The weight as the int8-activation decode kernel takes it (PackedTensor.int8_weight): the dense part's
        codes copied into the kernel's tiles, the statistics with them (`kernel_statistics`), the outliers'
        corrections as CSR entries the kernel adds in the task of their outputs (one call a product, both
        threads: SmolLM2's 210 products a token each took a separate serial call); None on the GPU or for
        groups of neither 16 nor whole runs of 32. Prefill then reads them too, and qweight's pages mapped from
        the model file go back to the OS."""
        if self._int8_weight is None and self.int8_codes() is not None:
            from runtime.checkpoints.safetensors_io import release_pages
            from runtime.kernels.uniform_int8_numba import HALF_RUN_GROUPS, block_weight
            from runtime.kernels.uniform_numba import readonly
            runs = HALF_RUN_GROUPS if self.group_size == HALF_RUN else self.group_size // RUN
            outliers = ((readonly(self.outliers.row_ptr), readonly(self.outliers.col_idx),
                         readonly(self.corrections)) if self.outliers.nnz else ())
            self._int8_weight = block_weight(self.qweight, *self.kernel_statistics(), readonly(self.perm),
                                             self.in_features, self.bits, runs)._replace(outliers=outliers)
            release_pages(self.qweight)
        return self._int8_weight

    def kernel_statistics(self) -> tuple:
        """(scales, zeros) as the int8 kernels read them, as compact as the kernels can decode: quantized
        statistics in blocks of whole tiles of 16 outputs stay codes with their float16 low and step
        (`coded_statistics`: 1.25 bits a weight at groups of 16, where float32 takes 4); float16 statistics stay
        float16 bits [n_groups, out]; other blocks are decoded to float32 [n_groups, out]."""
        from runtime.kernels.uniform_int8_numba import TILE, coded_statistics
        stats = {name: to_numpy(a) for name, a in self.stats.items()}
        if self.stat_bits == FP16_STATS:
            return stats["scales"].view(np.uint16), stats["zeros"].view(np.uint16)
        if self.stat_group % TILE:
            return self.statistics()
        return tuple(coded_statistics(self.stat_codes(name), stats[f"{name}_step"], stats[f"{name}_low"],
                                      self.stat_group) for name in ("scale", "zero"))

    def _add_outliers(self, x, y) -> None:
        """y [m, out] += x [m, in] @ (W - W_d).T: each outlier's correction (CSR kernel)."""
        if self.outliers.nnz:
            from runtime.kernels import sparse_numba
            sparse_numba.add_product(self.outliers.row_ptr, self.outliers.col_idx, self.corrections, x, y)

    def matmul_rows(self, x, on_gpu: bool):
        """y [m, out] = x [m, in] @ W.T: CUDA for CuPy input, Numba for NumPy input (dense + outliers)."""
        if on_gpu:
            from runtime.kernels import spqr_cuda
            return spqr_cuda.matmul(self, x)  # [m, out]
        mode, kernel = activation_mode()
        if x.shape[0] > 1 and self.int8_decodes(mode, kernel):  # decode's blocked codes, not qweight
            from runtime.kernels import uniform_prefill_numba
            values = np.arange(1 << self.bits, dtype=np.float32)  # [2**bits] a code's value is itself
            y = np.ascontiguousarray(uniform_prefill_numba.matmul(self.int8_weight(), values, x, kernel))  # [m, out]
        else:
            from runtime.kernels import spqr_numba
            y = spqr_numba.matmul_dense(self, x)  # [m, out]
        self._add_outliers(x, y)
        return y

    def tensors(self) -> dict:
        outliers = {OUTLIER_PREFIX + name: a for name, a in self.outliers.tensors().items()}
        return {"qweight": self.qweight, "perm": self.perm, **self.stats, **outliers}

    def meta(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "stat_bits": self.stat_bits,
                "stat_group": self.stat_group, "in_features": self.in_features, "out_features": self.out_features,
                "outliers": self.outliers.nnz}

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict) -> "SpQRTensor":
        keys = ("bits", "group_size", "stat_bits", "stat_group", "in_features", "out_features", "outliers")
        if any(type(meta.get(k)) is not int for k in keys):
            raise UserError(f"packed spqr tensor metadata needs integers {', '.join(keys)}; re-quantize the model")
        tensors = dict(tensors)
        outlier_parts = {name[len(OUTLIER_PREFIX):]: tensors.pop(name) for name in list(tensors)
                         if name.startswith(OUTLIER_PREFIX)}
        if set(outlier_parts) != {"values", "col_idx", "row_ptr"} or not {"qweight", "perm"} <= set(tensors):
            raise UserError(f"packed spqr tensor arrays {sorted(tensors)} lack qweight, perm or the outlier "
                            f"arrays; re-quantize the model")
        outliers = SparseTensor(**outlier_parts, in_features=meta["in_features"])
        qweight, perm = tensors.pop("qweight"), tensors.pop("perm")
        packed = cls(qweight, perm, tensors, outliers, bits=meta["bits"], group_size=meta["group_size"],
                     stat_bits=meta["stat_bits"], stat_group=meta["stat_group"])
        return packed.check_stated(meta, keys)

    def to_device(self, xp) -> "SpQRTensor":
        return SpQRTensor(to_module(self.qweight, xp), to_module(self.perm, xp),
                          {name: to_module(a, xp) for name, a in self.stats.items()},
                          self.outliers.to_device(xp), bits=self.bits, group_size=self.group_size,
                          stat_bits=self.stat_bits, stat_group=self.stat_group)
