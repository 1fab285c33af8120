"""The `uniform` format: integer codes on a uniform grid, a scale and zero point per group.

The storage of RTN and GPTQ weights (Frantar et al. 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers"), laid out
as the AutoGPTQ / GPTQModel checkpoints lay it out. A weight decodes as

    W[n, j] = (code[j, n] - zero[g, n]) * scale[g, n]      g = g_idx[j]

for output n, input column j, with codes and zeros in [0, 2**bits).

Arrays (in = in_features, out = out_features, b = bits in {2, 3, 4, 8}):

    qweight  int32   [ceil(in/32) * b, out]     codes, packed along the input dimension
    qzeros   int32   [n_groups, ceil(out/32) * b]  zero points, packed along the output dimension
    scales   float16 [n_groups, out]
    g_idx    int32   [in]                       group of each input column (original order)

Bit order. Codes are packed in runs of 32: 32 consecutive codes fill b
consecutive 32-bit words, read as one little-endian bit stream: code k of the
run occupies bits [k*b, (k+1)*b) of the stream, lowest bit first, and stream
bit p is bit p % 32 of word p // 32. In qweight a run is 32 input rows of one
output column (words stacked down a column); in qzeros it is 32 output columns
of one group (words side by side in a row). A run cut short by the end of the
dimension is padded with code 0. For 4 bits, word r of a column holds input
rows 8r .. 8r+7, the first one in the LOWEST nibble:

    bit  31     28 27     24 23                  8 7      4 3      0
        +---------+---------+-------- ... --------+--------+--------+
        | row 8r+7| row 8r+6|                     | row 8r+1| row 8r |
        +---------+---------+-------- ... --------+--------+--------+

2 and 8 bits are the same with 16 and 4 codes per word. 3 bits: a run of 32
codes fills three words with no wasted bit, and codes 10 and 21 straddle a
word boundary (AutoGPTQ's 3-bit order):

    word 0:  bits 0-29 codes 0-9        bits 30-31 code 10 (its bits 0-1)
    word 1:  bit  0    code 10 (bit 2)  bits 1-30 codes 11-20   bit 31 code 21 (bit 0)
    word 2:  bits 0-1  code 21 (bits 1-2)         bits 2-31 codes 22-31

Zero points. qzeros holds the TRUE zero point (GPTQModel's "v2" checkpoint
convention). AutoGPTQ ("v1") files store zero - 1; add 1 to each unpacked
zero when converting one. A symmetric grid (`sym`) has the fixed zero
2**(b-1), stored like any other.

Granularity. With `group_size` G (a positive multiple of 32) column j belongs
to group j // G; n_groups = ceil(in / G), so when G does not divide in the last
group is shorter. Per row (`group_size` -1) there is one group spanning all
inputs. Per tensor (`per_tensor`) is per row with every output's scale and
zero equal: the single scale is stored broadcast as [1, out].

Act-order. GPTQ's act-order quantizes columns in a permuted order and puts
column perm[i] in group i // G, so g_idx is no longer j // G. qweight then
stores the columns in group order: row-run position i holds column perm[i],
where perm = argsort(g_idx, stable). Every group is a contiguous run of G
positions, so kernels use position // G and gather x by perm once per call;
`dequantize` returns W in the ORIGINAL column order. (AutoGPTQ keeps qweight
in column order; convert such a file by reordering the unpacked codes by perm.)
Without act-order g_idx[j] = j // G (0 per row) and qweight is in column order.

Bits per weight, from the stored bytes:

    bytes = 4 * out * b * ceil(in/32)                 qweight
          + 4 * n_groups * b * ceil(out/32)           qzeros
          + 2 * n_groups * out                        scales
          + 4 * in                                    g_idx
    bits per weight = 8 * bytes / (in * out)
                    = b + (b + 16) / G + 32 / out      when 32 | in, 32 | out, G | in
                                                     (per row / per tensor: G = in)

e.g. 4.21 for 4 bits, G = 128, out = 576.
"""
from __future__ import annotations

import numpy as np

from runtime.device import array_module_of, is_cupy, to_module, to_numpy
from runtime.errors import UserError
from runtime.formats.base import PackedTensor, activation_mode, frozen, quantize_activation
from runtime.kernels.quant_activations_numba import LEVELS16

BITS = (2, 3, 4, 8)
RUN = 32  # codes per packed run (a run of b words)
PER_ROW = -1  # group_size meaning "one group per output row"


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [n, cols] (integers in [0, 2**bits)) -> int32 [ceil(n/32) * bits, cols], packed along axis 0."""
    n, cols = codes.shape
    runs = -(-n // RUN)
    padded = np.zeros((runs * RUN, cols), dtype=np.uint32)  # [runs*32, cols]
    padded[:n] = codes
    padded = padded.reshape(runs, RUN, cols)  # [runs, 32, cols]
    words = np.zeros((runs, bits, cols), dtype=np.uint32)  # [runs, bits, cols]
    for k in range(RUN):
        word, offset = divmod(k * bits, 32)
        words[:, word] |= padded[:, k] << np.uint32(offset)  # bits past 31 fall off (uint32)
        if offset + bits > 32:
            words[:, word + 1] |= padded[:, k] >> np.uint32(32 - offset)
    return words.reshape(runs * bits, cols).view(np.int32)


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """int32 [ceil(n/32) * bits, cols] -> codes uint8 [n, cols]; the inverse of `pack`."""
    runs = packed.shape[0] // bits
    words = np.ascontiguousarray(packed).view(np.uint32).reshape(runs, bits, -1)  # [runs, bits, cols]
    mask = np.uint32((1 << bits) - 1)
    codes = np.empty((runs, RUN, words.shape[2]), dtype=np.uint8)  # [runs, 32, cols]
    for k in range(RUN):
        word, offset = divmod(k * bits, 32)
        value = words[:, word] >> np.uint32(offset)
        if offset + bits > 32:
            value |= words[:, word + 1] << np.uint32(32 - offset)
        codes[:, k] = value & mask
    return codes.reshape(runs * RUN, -1)[:n]


def storage_order(g_idx: np.ndarray) -> np.ndarray:
    """perm [in]: qweight row-run position i holds input column perm[i] (argsort of g_idx, stable)."""
    return np.argsort(g_idx, kind="stable")


def dequantize(qweight, qzeros, scales, g_idx, bits: int) -> np.ndarray:
    """The format's definition: W [out, in] float32 = (code - zero) * scale, in original column order."""
    n_in, n_out = g_idx.shape[0], scales.shape[1]
    perm = storage_order(g_idx)  # [in]
    codes = unpack(qweight, bits, n_in).astype(np.float32)  # [in, out], storage order
    zeros = unpack(np.ascontiguousarray(qzeros.T), bits, n_out).T.astype(np.float32)  # [n_groups, out]
    groups = g_idx[perm]  # [in] group of each storage position
    w_stored = (codes - zeros[groups]) * scales[groups].astype(np.float32)  # [in, out]
    w = np.empty((n_out, n_in), dtype=np.float32)  # [out, in]
    w[:, perm] = w_stored.T
    return w


def matmul(x, qweight, qzeros, scales, g_idx, bits: int) -> np.ndarray:
    """The reference product: y [..., out] = x [..., in] @ dequantize(...).T."""
    return np.asarray(x, dtype=np.float32) @ dequantize(qweight, qzeros, scales, g_idx, bits).T


def group_index(n_in: int, group_size: int) -> np.ndarray:
    """g_idx [in] without act-order: column j in group j // group_size (all 0 per row)."""
    if group_size == PER_ROW:
        return np.zeros(n_in, dtype=np.int32)
    return (np.arange(n_in) // group_size).astype(np.int32)


def check_params(bits: int, group_size: int) -> None:
    """UserError unless bits is 2, 3, 4 or 8 and group_size a positive multiple of 32 or -1."""
    if bits not in BITS:
        raise UserError(f"uniform format: bits must be one of {BITS}, got {bits}")
    if group_size != PER_ROW and (group_size <= 0 or group_size % RUN):
        raise UserError(f"uniform format: group_size must be a multiple of {RUN} (32, 64, 128, ...) "
                        f"or -1 for one group per row, got {group_size}")


class UniformTensor(PackedTensor):
    """W [out, in] as 2/3/4/8-bit codes with a float16 scale and integer zero per group (layout above)."""

    FORMAT = "uniform"

    def __init__(self, qweight, qzeros, scales, g_idx, *, bits: int, group_size: int, sym: bool,
                 per_tensor: bool = False):
        """Wrap packed arrays (NumPy, or CuPy via `to_device`); UserError when they do not fit together."""
        if getattr(g_idx, "ndim", 0) != 1 or getattr(scales, "ndim", 0) != 2:
            raise UserError(f"packed tensor g_idx / scales must be 1-D / 2-D, got shapes "
                            f"{list(np.shape(g_idx))} / {list(np.shape(scales))}; re-quantize the model")
        self.qweight = frozen(qweight)  # [ceil(in/32)*bits, out] int32
        self.qzeros = frozen(qzeros)  # [n_groups, ceil(out/32)*bits] int32
        self.scales = frozen(scales)  # [n_groups, out] float16
        self.g_idx = frozen(g_idx)  # [in] int32
        self.bits = int(bits)
        self.group_size = int(group_size)
        self.sym = bool(sym)
        self.per_tensor = bool(per_tensor)
        self.in_features = int(g_idx.shape[0])
        self.out_features = int(scales.shape[1])
        self._check()
        self._int8_weight = None  # the int8 decode kernel's view of the arrays, made on first use
        g_idx_host = to_numpy(g_idx)
        self.act_order = not np.array_equal(g_idx_host, group_index(self.in_features, self.group_size))
        self.perm = None  # [in] int32 storage order, None when it is the identity
        if self.act_order:
            self.perm = frozen(array_module_of(g_idx).asarray(storage_order(g_idx_host).astype(np.int32)))

    @classmethod
    def from_codes(cls, codes, scales, zeros, *, bits: int, group_size: int, sym: bool,
                   per_tensor: bool = False, g_idx=None) -> "UniformTensor":
        """Pack codes [out, in] (ints in [0, 2**bits), original column order), scales [n_groups, out]
        (rounded to float16) and zeros [n_groups, out]; g_idx [in] defaults to column // group_size."""
        n_out, n_in = codes.shape
        check_params(bits, group_size)
        for name, a in (("codes", codes), ("zeros", zeros)):
            if np.min(a) < 0 or np.max(a) >= 1 << bits:
                raise UserError(f"uniform format: {name} must lie in [0, {(1 << bits) - 1}] for {bits} bits")
        g_idx = group_index(n_in, group_size) if g_idx is None else np.asarray(g_idx, dtype=np.int32)
        perm = storage_order(g_idx)  # [in]
        qweight = pack(np.ascontiguousarray(codes.T[perm]), bits)  # [ceil(in/32)*bits, out]
        qzeros = np.ascontiguousarray(pack(np.ascontiguousarray(np.asarray(zeros).T), bits).T)  # [n_groups, ...]
        return cls(qweight, qzeros, np.asarray(scales, dtype=np.float16), g_idx,
                   bits=bits, group_size=group_size, sym=sym, per_tensor=per_tensor)

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[0])

    def _expected(self) -> dict:
        """name -> (dtype, shape) every array must have, from the parameters."""
        n_in, n_out, b = self.in_features, self.out_features, self.bits
        n_groups = 1 if self.group_size == PER_ROW else -(-n_in // self.group_size)
        return {"qweight": (np.int32, (-(-n_in // RUN) * b, n_out)),
                "qzeros": (np.int32, (n_groups, -(-n_out // RUN) * b)),
                "scales": (np.float16, (n_groups, n_out)),
                "g_idx": (np.int32, (n_in,))}

    def _check(self):
        """Shapes and dtypes against the parameters; on NumPy arrays also the values of the side data."""
        check_params(self.bits, self.group_size)
        if self.per_tensor and self.group_size != PER_ROW:
            raise UserError(f"uniform format: per_tensor needs group_size -1, got {self.group_size}")
        for name, (dtype, shape) in self._expected().items():
            a = getattr(self, name)
            if a.dtype != dtype or tuple(a.shape) != shape:
                raise UserError(f"packed tensor {name} does not match its metadata: expected "
                                f"{np.dtype(dtype).name} {list(shape)}, got {a.dtype} {list(a.shape)}; "
                                f"re-quantize the model")
        if is_cupy(self.qweight):
            return
        zeros = unpack(np.ascontiguousarray(self.qzeros.T), self.bits, self.out_features).T  # [n_groups, out]
        problems = []
        if not np.isfinite(self.scales).all():
            problems.append("scales are not all finite")
        if self.sym and (zeros != 1 << (self.bits - 1)).any():
            problems.append(f"a symmetric grid needs every zero = {1 << (self.bits - 1)}")
        if self.per_tensor and ((self.scales != self.scales[0, 0]).any() or (zeros != zeros[0, 0]).any()):
            problems.append("per_tensor needs one scale and zero for all outputs")
        if not np.array_equal(np.sort(self.g_idx), group_index(self.in_features, self.group_size)):
            problems.append(f"g_idx must put exactly group_size={self.group_size} columns in each group")
        if problems:
            raise UserError(f"packed tensor does not match its metadata: {'; '.join(problems)}; "
                            f"re-quantize the model")

    def dequantize(self):
        """W [out, in] float32 in original column order (the NumPy reference; NumPy arrays for CuPy ones)."""
        arrays = {name: to_numpy(a) for name, a in self.tensors().items()}
        return dequantize(**arrays, bits=self.bits)

    def dequantize_cpu(self) -> np.ndarray:
        """W [out, in] float32 by the Numba tile decoder on the calling thread, back in original column order:
        the transpose of the decoder's [in, out] rows (Fortran order; BLAS takes either order as it is, where
        a C-order copy of a vocabulary-sized head took 0.4 s)."""
        from runtime.kernels import uniform_numba

        stored = uniform_numba.dequantize_storage(self)[:self.in_features]  # [in, out] storage order
        if self.perm is not None:
            stored = np.take(stored, np.argsort(self.perm), axis=0)  # [in, out] original order: Wᵀ[perm[j]] = row j
        return stored.T  # [out, in]

    def matmul_reference(self, x) -> np.ndarray:
        """y [..., out] = x [..., in] @ W.T through the NumPy reference."""
        return x @ self.dequantize().T

    def matmul_reference_int8(self, x, levels: int = LEVELS16) -> np.ndarray:
        """y [m, out] = x_hat @ W.T, x_hat = x [m, in] quantized as the integer kernels do (the reference of
        the int8-activation path: two-byte activations, LEVELS16, in decode and prefill alike)."""
        perm = None if self.perm is None else to_numpy(self.perm)
        return quantize_activation(x, perm, levels) @ self.dequantize().T

    def int8_codes(self):
        """(bits, no table) on the CPU (PackedTensor.int8_codes)."""
        return None if is_cupy(self.qweight) else (self.bits, False)

    def int8_weight(self):
        """This weight as the int8-activation decode kernel takes it (PackedTensor.int8_weight); None on the GPU."""
        if self._int8_weight is None and not is_cupy(self.qweight):
            from runtime.checkpoints.safetensors_io import release_pages
            from runtime.kernels.uniform_int8_numba import kernel_weight
            self._int8_weight = kernel_weight(self)
            release_pages(self.qweight)
        return self._int8_weight

    def matmul_rows(self, x, on_gpu: bool):
        """y [m, out] = x [m, in] @ W.T with float activations: CUDA for CuPy input, Numba for NumPy input;
        several rows read the int8 kernel's blocked codes where decode uses them (built here if need be: the
        stored codes' pages mapped from the model file then go back to the OS, not held twice), multiplied in
        integers with two-byte activations on AVX-512 VNNI (runtime/kernels/uniform_prefill_numba.py)."""
        if on_gpu:
            from runtime.kernels import uniform_cuda
            return uniform_cuda.matmul(self, x)  # [m, out]
        mode, kernel = activation_mode()
        if x.shape[0] > 1 and self.int8_decodes(mode, kernel):
            from runtime.kernels import uniform_prefill_numba
            values = np.arange(1 << self.bits, dtype=np.float32)  # [2**bits] a code's value is itself
            return uniform_prefill_numba.matmul(self.int8_weight(), values, x, kernel)  # [m, out]
        from runtime.kernels import uniform_numba
        return uniform_numba.matmul(self, x)  # [m, out]

    def tensors(self) -> dict:
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}

    def meta(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                "per_tensor": self.per_tensor, "act_order": self.act_order,
                "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict) -> "UniformTensor":
        names = {"qweight", "qzeros", "scales", "g_idx"}
        if set(tensors) != names:
            raise UserError(f"packed tensor arrays {sorted(tensors)} do not match its metadata "
                            f"(format uniform needs {sorted(names)}); re-quantize the model")
        keys = ("bits", "group_size", "sym", "per_tensor", "act_order", "in_features", "out_features")
        cls.require_meta(meta, keys)
        wrong = [k for k in keys if type(meta[k]) is not (bool if k in ("sym", "per_tensor", "act_order") else int)]
        if wrong:
            raise UserError(f"packed tensor metadata has values of the wrong type for {', '.join(wrong)}; "
                            f"re-quantize the model")
        packed = cls(**tensors, bits=meta["bits"], group_size=meta["group_size"], sym=meta["sym"],
                     per_tensor=meta["per_tensor"])
        return packed.check_stated(meta, keys)

    def to_device(self, xp) -> "UniformTensor":
        moved = {name: to_module(a, xp) for name, a in self.tensors().items()}
        return UniformTensor(**moved, bits=self.bits, group_size=self.group_size, sym=self.sym,
                             per_tensor=self.per_tensor)

