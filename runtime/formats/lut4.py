"""The lut4 format: 4-bit codes into a 16-value table, one absmax per block.

The storage of QLoRA's NF4 and FP4 weights (Dettmers et al. 2023, "QLoRA:
Efficient Finetuning of Quantized LLMs", §3), laid out as bitsandbytes does.
A weight is `table[code] * absmax` of its block; a block is `block_size`
consecutive weights of one row (row-major order of W [out, in]; `in` must be
a multiple of `block_size`, and `block_size` a multiple of 8, so no block
straddles two rows and every row is a whole number of 32-bit words).

    qweight  uint8 [out, in/2]   byte k of row o holds two weights, the
                                 FIRST one in the HIGH nibble (as bitsandbytes):

                   bit 7      4 3      0
                     +---------+---------+
                     | w[o,2k] |w[o,2k+1]|
                     +---------+---------+

    table    float32 [16]        code -> value in [-1, 1] (NF4, FP4, ...)
    absmax   float32 [out, in/B] block b of row o covers w[o, bB : (b+1)B]

    W[o, i] = table[code(o, i)] * absmax[o, i // B]

Double quantization (QLoRA §3 "Double Quantization", as bitsandbytes'
`compress_statistics`) replaces `absmax` by 8-bit codes: the fp32 absmax
values, in row-major order, minus their mean, are cut into runs of 256 and
each run is absmax-quantized to the signed 8-bit "dynamic" map (Dettmers
2016, "8-Bit Approximations for Parallelism in Deep Learning"; `dynamic_map`):

    absmax_q      uint8   [out, in/B]                 index into dynamic_map()
    absmax_scale  float32 [ceil(out * in/B / 256)]    max |absmax - mean| of each run
    absmax_mean   float32 [1]

    absmax[o, b] = dynamic_map()[absmax_q[o, b]] * absmax_scale[(o * in/B + b) // 256]
                   + absmax_mean                       (float32 arithmetic)

The dynamic map is a constant of the format (derived in code), not stored.
Its widest gap is 0.9/64 (top decade), so the reconstructed absmax is within
0.9/128 * absmax_scale of the true one (`DQ_MAX_ERROR`).

Bits per weight from the stored bytes (N = out * in, B = block_size):

    plain:        4 + 32/B + 512/N                     = 4.5 at B = 64
    double quant: 4 + 8/B + 32/(256 B) + (512 + 32)/N  ~ 4.127 at B = 64

(the 512/N term is the stored table, the 32/N term the mean; both vanish
for large N). The paper quotes 4.5 and 4.127 bits.
"""
from __future__ import annotations

import functools

import numpy as np

from runtime.device import is_cupy, to_module
from runtime.errors import UserError
from runtime.formats.base import PackedTensor, activation_mode, quantize_activation
from runtime.kernels.quant_activations_numba import LEVELS16
from runtime.formats.uniform import RUN

TABLE_SIZE = 16
LUT_LEVELS = 2047  # max|table| maps to this: 32 values times two-byte activations (LEVELS16) sum within int32
DQ_BLOCK_SIZE = 256
DQ_MAX_ERROR = 0.9 / 128  # max |absmax error| / absmax_scale under double quantization
FUSED_MAX_ROWS = 3  # NumPy input with at most this many rows: fused Numba kernel (measured crossover)


@functools.lru_cache(maxsize=None)
def dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic quantization map, 256 sorted float32 values in [-1, 1].

    Dynamic tree quantization (Dettmers 2016, §3), with the values
    bitsandbytes' `create_dynamic_map(signed=True)` builds: a sign bit, then
    e zero bits selecting the decade 10**-e, a 1 bit ending them, and the
    remaining 6 - e bits as a linear fraction. So decade 10**-e (e = 0..6)
    holds 2**(6 - e) magnitudes: the midpoints of that many equal bins of
    [0.1, 1], times 10**-e. That is 127 magnitudes per sign, plus 0 and 1.0:
    256 values. The result is read-only (it is shared).
    """
    magnitudes = []
    for e in range(7):
        edges = np.linspace(0.1, 1.0, 2 ** (6 - e) + 1)
        midpoints = (edges[:-1] + edges[1:]) / 2
        magnitudes.append(midpoints * 10.0**-e)
    positive = np.concatenate(magnitudes)  # [127]
    values = np.sort(np.concatenate([positive, -positive, [0.0, 1.0]])).astype(np.float32)  # [256]
    values.setflags(write=False)
    return values


def lut_table(table: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """(lut uint8 [32], step) of the int8-activation kernels (runtime/kernels/uniform_int8_numba.py): the
    table [16] float32 rounded to the signed 12-bit V = rint(table / step), step = max|table| / 2047, stored
    as the high bytes lut[:16] and low bytes lut[16:] of V as int16; code c then stands for
    V[c] * step * absmax (`matmul_reference_int8`)."""
    step = np.float32(np.abs(table).max() / np.float32(LUT_LEVELS)) or np.float32(1.0)
    values = np.rint(table / step).astype(np.int64)  # [16] in [-2047, 2047]
    return np.concatenate([(values >> 8) & 255, values & 255]).astype(np.uint8), step


def lut_values(lut: np.ndarray) -> np.ndarray:
    """V [16] int64 of a `lut_table` (the int16 of high byte lut[c] and low byte lut[16 + c])."""
    values = lut[:TABLE_SIZE].astype(np.int64) * 256 + lut[TABLE_SIZE:]  # [16] as uint16
    return np.where(values >= 1 << 15, values - (1 << 16), values)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """codes [out, in] (values 0..15, in even) -> bytes [out, in/2], first code in the high nibble."""
    codes = codes.astype(np.uint8)
    return (codes[:, 0::2] << 4) | codes[:, 1::2]  # [out, in/2]


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """bytes [out, in/2] -> codes [out, in] uint8 (high nibble first)."""
    codes = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)  # [out, in]
    codes[:, 0::2] = packed >> 4
    codes[:, 1::2] = packed & 0x0F
    return codes


def dequantize_absmax(absmax_q, absmax_scale, absmax_mean) -> np.ndarray:
    """Double-quantized absmax -> float32 absmax [out, in/B] (the format's definition)."""
    n_out, n_blocks = absmax_q.shape
    run = np.arange(n_out * n_blocks).reshape(n_out, n_blocks) // DQ_BLOCK_SIZE  # [out, in/B]
    return dynamic_map()[absmax_q] * absmax_scale[run] + absmax_mean[0]  # [out, in/B]


class Lut4Tensor(PackedTensor):
    """W [out, in] as 4-bit codes into a 16-value table with a (double-quantized) absmax per block."""

    FORMAT = "lut4"

    def __init__(self, qweight, table, block_size: int, absmax=None,
                 absmax_q=None, absmax_scale=None, absmax_mean=None):
        """Wrap packed arrays (layout in the module docstring); either `absmax` or the three absmax_* arrays.

        Raises UserError when the arrays do not fit together.
        """
        self.qweight = qweight  # [out, in/2] uint8
        self.table = table  # [16] float32
        self.block_size = int(block_size)
        self.absmax = absmax  # [out, in/B] float32, or None under double quantization
        self.absmax_q = absmax_q  # [out, in/B] uint8
        self.absmax_scale = absmax_scale  # [ceil(out*in/B / 256)] float32
        self.absmax_mean = absmax_mean  # [1] float32
        self._check()
        self._int8_weight = None  # the int8 decode kernel's repacked codes, built on first use

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.qweight.shape[0]), int(self.qweight.shape[1]) * 2

    def _check(self):
        def fail(what):
            raise UserError(f"lut4 tensor: {what}; re-quantize the weight or use the file it was saved with")

        if self.block_size <= 0 or self.block_size % 8:
            fail(f"block_size {self.block_size} is not a positive multiple of 8")
        if self.qweight.ndim != 2 or self.qweight.dtype != np.uint8:
            fail(f"qweight must be uint8 [out, in/2], got {self.qweight.dtype} {tuple(self.qweight.shape)}")
        n_out, n_in = self.shape
        if n_in % self.block_size:
            fail(f"in_features {n_in} is not a multiple of block_size {self.block_size}")
        if self.table.shape != (TABLE_SIZE,) or self.table.dtype != np.float32:
            fail(f"table must be float32 [16], got {self.table.dtype} {tuple(self.table.shape)}")
        blocks = (n_out, n_in // self.block_size)
        dq_parts = (self.absmax_q, self.absmax_scale, self.absmax_mean)
        if self.absmax is not None:
            if any(p is not None for p in dq_parts):
                fail("give either absmax or absmax_q/absmax_scale/absmax_mean, not both")
            if self.absmax.shape != blocks or self.absmax.dtype != np.float32:
                fail(f"absmax must be float32 {list(blocks)}, got {self.absmax.dtype} {tuple(self.absmax.shape)}")
            return
        if any(p is None for p in dq_parts):
            fail("missing absmax (or all of absmax_q, absmax_scale, absmax_mean)")
        n_runs = -(-blocks[0] * blocks[1] // DQ_BLOCK_SIZE)
        if self.absmax_q.shape != blocks or self.absmax_q.dtype != np.uint8:
            fail(f"absmax_q must be uint8 {list(blocks)}, got {self.absmax_q.dtype} {tuple(self.absmax_q.shape)}")
        if self.absmax_scale.shape != (n_runs,) or self.absmax_scale.dtype != np.float32:
            fail(f"absmax_scale must be float32 [{n_runs}], got {self.absmax_scale.dtype} "
                 f"{tuple(self.absmax_scale.shape)}")
        if self.absmax_mean.shape != (1,) or self.absmax_mean.dtype != np.float32:
            fail(f"absmax_mean must be float32 [1], got {self.absmax_mean.dtype} {tuple(self.absmax_mean.shape)}")

    def block_absmax(self) -> np.ndarray:
        """float32 absmax [out, in/B] of every block (decoded when double-quantized; NumPy arrays)."""
        if self.double_quant:
            return dequantize_absmax(self.absmax_q, self.absmax_scale, self.absmax_mean)
        return self.absmax

    def dequantize(self):
        """W [out, in] float32 = table[code] * absmax of its block (the NumPy reference; CUDA for CuPy arrays)."""
        if is_cupy(self.qweight):
            from runtime.kernels import lut4_cuda

            return lut4_cuda.dequantize(self)
        codes = unpack_nibbles(self.qweight)  # [out, in]
        scale = np.repeat(self.block_absmax(), self.block_size, axis=1)  # [out, in]
        return self.table[codes] * scale  # [out, in]

    def dequantize_cpu(self) -> np.ndarray:
        """W [out, in] float32 by the Numba decoder on the calling thread (runtime/kernels/lut4_numba.py)."""
        from runtime.kernels import lut4_numba

        return lut4_numba.dequantize(self)  # [out, in]

    def matmul_reference(self, x) -> np.ndarray:
        """y [..., out] = x [..., in] @ W.T through the NumPy reference `dequantize`."""
        return np.asarray(x, dtype=np.float32) @ self.dequantize().T

    def matmul_reference_int8(self, x, levels: int = LEVELS16) -> np.ndarray:
        """y [m, out] = x_hat @ W_hat.T, the reference of the int8-activation path: x [m, in] quantized as the
        integer kernels do (`quantize_activation`: two bytes, LEVELS16, in decode and prefill), the table
        rounded as `lut_table` does."""
        lut, step = lut_table(self.table)
        values = lut_values(lut).astype(np.float32) * step  # [16]
        codes = unpack_nibbles(self.qweight)  # [out, in]
        w_hat = values[codes] * np.repeat(self.block_absmax(), self.block_size, axis=1)  # [out, in]
        return quantize_activation(np.asarray(x, dtype=np.float32), None, levels) @ w_hat.T

    def int8_codes(self):
        """(4 bits, a table) on the CPU for blocks of whole runs of 32 (PackedTensor.int8_codes)."""
        return None if is_cupy(self.qweight) or self.block_size % RUN else (4, True)

    def int8_weight(self):
        """The codes repacked for the int8-activation decode kernel (PackedTensor.int8_weight), built on first
        use and kept (as many bytes as qweight); None on the GPU or for blocks that are not whole runs of 32.
        Once built, prefill reads them too (with the kernel's float32 scale per block), and qweight's pages
        mapped from the model file are handed back to the OS (read again only if something else needs them:
        saving, the GPU, the float-activation kernel), so the codes are not held twice."""
        if self._int8_weight is None and self.int8_codes() is not None:
            from runtime.kernels import lut4_numba
            from runtime.checkpoints.safetensors_io import release_pages
            self._int8_weight = lut4_numba.decode_weight(self)
            release_pages(self.qweight)
        return self._int8_weight

    def matmul_rows(self, x, on_gpu: bool):
        """y [m, out] = x [m, in] @ W.T: CUDA for CuPy input, Numba for NumPy input."""
        if on_gpu:
            from runtime.kernels import lut4_cuda
            return lut4_cuda.matmul(self, x)  # [m, out]
        from runtime.kernels import lut4_numba
        if x.shape[0] <= FUSED_MAX_ROWS:
            return lut4_numba.matmul_fused(self, x)  # [m, out]
        mode, kernel = activation_mode()
        weight = self.int8_weight() if self.int8_decodes(mode, kernel) else None
        if weight is not None:  # decode repacks the codes anyway: prefill reads them too, not qweight
            return lut4_numba.matmul_prefill_repacked(self, weight, x, kernel)  # [m, out]
        return lut4_numba.matmul_prefill(self, x)  # [m, out]

    def tensors(self) -> dict:
        arrays = {"qweight": self.qweight, "table": self.table}
        if self.double_quant:
            arrays.update(absmax_q=self.absmax_q, absmax_scale=self.absmax_scale, absmax_mean=self.absmax_mean)
        else:
            arrays["absmax"] = self.absmax
        return arrays

    def meta(self) -> dict:
        meta = {"shape": list(self.shape), "block_size": self.block_size, "double_quant": self.double_quant}
        if self.double_quant:
            meta["double_quant_block_size"] = DQ_BLOCK_SIZE
        return meta

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict) -> "Lut4Tensor":
        double_quant = bool(meta.get("double_quant", False))
        names = {"qweight", "table"} | ({"absmax_q", "absmax_scale", "absmax_mean"} if double_quant else {"absmax"})
        if set(tensors) != names:
            raise UserError(f"lut4 tensor: arrays {sorted(tensors)} do not match the metadata "
                            f"(double_quant={double_quant} needs {sorted(names)}); the file is corrupt")
        if not isinstance(meta.get("block_size"), int) or "shape" not in meta:
            raise UserError("lut4 tensor: metadata lacks an integer block_size or a shape; the file is corrupt")
        if double_quant and meta.get("double_quant_block_size") != DQ_BLOCK_SIZE:
            raise UserError(f"lut4 tensor: double_quant_block_size {meta.get('double_quant_block_size')} "
                            f"is not supported (only {DQ_BLOCK_SIZE})")
        packed = cls(block_size=meta["block_size"], **tensors)
        if list(packed.shape) != list(meta["shape"]):
            raise UserError(f"lut4 tensor: metadata shape {meta['shape']} does not match the arrays' "
                            f"{list(packed.shape)}; the file is corrupt")
        return packed

    def to_device(self, xp) -> "Lut4Tensor":
        moved = {name: to_module(a, xp) for name, a in self.tensors().items()}
        return Lut4Tensor(block_size=self.block_size, **moved)
