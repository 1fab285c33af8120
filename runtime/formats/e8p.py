"""The e8p format: QuIP# weights, E8P lattice codes between two randomized Hadamard transforms.

Tseng, Chee, Sun, Kuleshov, De Sa 2024, "QuIP#: Even Better LLM Quantization
with Hadamard Incoherence and Lattice Codebooks": §3 (randomized Hadamard
transform), §4.2 (E8P codebook), §4.3 (residual vector quantization). The
codebooks and the 16-bit code layout are in runtime/e8p_codebook.py, the Hadamard
matrices in runtime/hadamard.py.

A weight W [out, in] is stored as

    W = diag(s_out) · Hₒᵀ · Ŵ · Hᵢ · diag(s_in)        Ŵ = Σ_k scale_k · decode_k(codes_k)

with Hᵢ, Hₒ the orthonormal Hadamard matrices (hadamard_matrix(n) / sqrt(n))
of sizes in and out, s_in, s_out random ±1 vectors, and Ŵ [out, in] the
codebook-decoded matrix: entry Ŵ[o, 8g + i] is coordinate i of the point
that code [o, g] decodes to. So a product is

    y = x Wᵀ = ((x ⊙ s_in) Hᵢᵀ) Ŵᵀ Hₒ ⊙ s_out
      = fast_hadamard(fast_hadamard(x ⊙ s_in) Ŵᵀ, transpose=True) ⊙ s_out

and a method quantizes Ŵ_target = Hₒ diag(s_out) W diag(s_in) Hᵢᵀ (quipsharp.py,
in float64). Inputs seen by Ŵ are x' = (x ⊙ s_in) Hᵢᵀ, so the Hessian
transforms as H' = Hᵢ diag(s_in) H diag(s_in) Hᵢᵀ. `from_incoherent` undoes it.

Arrays (G = in / 8; in must be a multiple of 8):

    qweight       uint16  [out, G]          stage-1 E8P codes (16 bits per 8 weights)
    qweight_2     uint16  [out, G]          4 bits: stage-2 E8P codes
                  uint8   [out, G]          3 bits: stage-2 1-bit E8 codes (8 bits per 8 weights)
                                            (absent at 2 bits)
    stage_scales  float32 [n_stages]        scale_k above
    sign_in       uint8   [ceil(in / 8)]    s_in as bits: bit i % 8 of byte i // 8 set <=> s_in[i] = -1
    sign_out      uint8   [ceil(out / 8)]   s_out, the same way (LOWEST bit first)

The Hadamard factorizations (K, p) of in and out are stored in the metadata
and checked against runtime.hadamard on load. The metadata's `codebook` names
the codebook variant (runtime/e8p_codebook.py `VARIANTS`): absent for the
default "lexicographic" (this project's quantizer), "quip-sharp" for
checkpoints imported from the QuIP# reference.

Bits per weight, from the stored bytes (N = in * out):

    codes:        2 (E8P) + 2 (second E8P, 4 bits) or + 1 (1-bit E8, 3 bits)
    side data:    (32 * n_stages + 8 * ceil(in/8) + 8 * ceil(out/8)) / N
    e.g. 2 bits, 576 x 576: 2 + (32 + 576 + 576) / 331776 = 2.0036
"""
from __future__ import annotations

import numpy as np

from runtime import e8p_codebook
from runtime.device import is_cupy, to_module, to_numpy
from runtime.errors import UserError
from runtime.formats.base import PackedTensor, activation_mode, quantize_activation
from runtime.hadamard import fast_hadamard, hadamard_factor

FUSED_MAX_ROWS = 3  # NumPy input with at most this many rows: fused Numba kernel (not tuned)
SECOND_STAGE_DTYPE = {3: np.uint8, 4: np.uint16}


def pack_signs(signs) -> np.ndarray:
    """±1 vector [n] -> uint8 [ceil(n/8)], bit i % 8 of byte i // 8 set where signs[i] < 0."""
    signs = np.asarray(signs)
    if signs.ndim != 1 or not np.isin(signs, (-1, 1)).all():
        raise UserError("e8p format: sign vectors must be 1-D arrays of ±1; draw them with "
                        "runtime.hadamard.random_signs")
    return np.packbits(signs < 0, bitorder="little")


def unpack_signs(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 [ceil(n/8)] -> float32 ±1 [n]; the inverse of `pack_signs`."""
    bits = np.unpackbits(np.asarray(packed), count=n, bitorder="little")  # [n]
    return (1.0 - 2.0 * bits).astype(np.float32)


def from_incoherent(w_hat: np.ndarray, sign_in, sign_out) -> np.ndarray:
    """W [out, in] = diag(s_out) Hₒᵀ Ŵ Hᵢ diag(s_in): the weight incoherent codes Ŵ [out, in] stand for."""
    rotated_out = fast_hadamard(np.asarray(w_hat, dtype=np.float32).T, transpose=True).T  # [out, in] = Hₒᵀ Ŵ
    return fast_hadamard(rotated_out, transpose=True) * sign_in * sign_out[:, None]  # [out, in]


def decode_incoherent(stage_codes: list, stage_scales, bits: int,
                      codebook: str = e8p_codebook.DEFAULT_VARIANT) -> np.ndarray:
    """Ŵ [out, in] float32 = Σ_k scale_k · decode_k(codes_k) for code arrays [out, in/8] (the reference)."""
    stages = e8p_codebook.stage_codebooks(bits, codebook)
    w_hat = None
    for stage, scale, codes in zip(stages, stage_scales, stage_codes):
        part = np.float32(scale) * stage.decode(codes)  # [out, in/8, 8]
        w_hat = part if w_hat is None else w_hat + part
    return w_hat.reshape(w_hat.shape[0], -1)  # [out, in]


class E8PTensor(PackedTensor):
    """W [out, in] as E8P (+ residual) codes between random-sign Hadamard transforms (layout above)."""

    FORMAT = "e8p"

    def __init__(self, qweight, stage_scales, sign_in, sign_out, *, bits: int, in_features: int,
                 qweight_2=None, codebook: str = e8p_codebook.DEFAULT_VARIANT):
        """Wrap stored arrays (NumPy, or CuPy via `to_device`); UserError when they do not fit together."""
        self.qweight = qweight  # [out, in/8] uint16
        self.qweight_2 = qweight_2  # [out, in/8] uint16 (4 bits) / uint8 (3 bits) / None (2 bits)
        self.stage_scales = stage_scales  # [n_stages] float32
        self.sign_in = sign_in  # [ceil(in/8)] uint8
        self.sign_out = sign_out  # [ceil(out/8)] uint8
        self.bits = int(bits)
        self.in_features = int(in_features)
        self.out_features = int(qweight.shape[0]) if getattr(qweight, "ndim", 0) == 2 else -1
        self.codebook = codebook  # codebook variant (runtime/e8p_codebook.py VARIANTS)
        self._check()
        self.hadamard_in = hadamard_factor(self.in_features)
        self.hadamard_out = hadamard_factor(self.out_features)
        host = {name: to_numpy(a) for name, a in (("sign_in", sign_in), ("sign_out", sign_out))}
        signs_in = unpack_signs(host["sign_in"], self.in_features)  # [in]
        signs_out = unpack_signs(host["sign_out"], self.out_features)  # [out]
        on_gpu = is_cupy(qweight)
        if on_gpu:
            import cupy

            signs_in, signs_out = cupy.asarray(signs_in), cupy.asarray(signs_out)
        self.signs_in = signs_in  # [in] float32 ±1 (derived, not stored)
        self.signs_out = signs_out  # [out] float32 ±1 (derived, not stored)
        self.host_scales = [float(s) for s in (stage_scales.get() if on_gpu else stage_scales)]

    @classmethod
    def from_codes(cls, stage_codes: list, stage_scales: list, sign_in, sign_out, bits: int,
                   shape: tuple[int, int], codebook: str = e8p_codebook.DEFAULT_VARIANT) -> "E8PTensor":
        """Pack per-stage codes [out, in/8] of a codebook variant, stage scales, ±1 sign vectors [in] / [out]
        for W of `shape`."""
        e8p_codebook.check_bits(bits)
        n_out, n_in = shape
        stages = e8p_codebook.stage_codebooks(bits)
        if len(stage_codes) != len(stages) or len(stage_scales) != len(stages):
            raise UserError(f"e8p format: {bits} bits needs {len(stages)} code arrays and stage scales, got "
                            f"{len(stage_codes)} and {len(stage_scales)}")
        codes = [np.ascontiguousarray(c, dtype=s.code_dtype) for c, s in zip(stage_codes, stages)]
        if len(np.asarray(sign_in)) != n_in or len(np.asarray(sign_out)) != n_out:
            raise UserError(f"e8p format: sign vectors must have lengths in={n_in} and out={n_out}, got "
                            f"{len(np.asarray(sign_in))} and {len(np.asarray(sign_out))}")
        return cls(codes[0], np.asarray(stage_scales, dtype=np.float32), pack_signs(sign_in), pack_signs(sign_out),
                   bits=bits, in_features=n_in, qweight_2=codes[1] if len(codes) > 1 else None, codebook=codebook)

    @property
    def stage_codes(self) -> list:
        """The code arrays [out, in/8] of the stages, first stage first."""
        return [self.qweight] if self.qweight_2 is None else [self.qweight, self.qweight_2]

    def _check(self):
        def fail(what):
            raise UserError(f"e8p tensor: {what}; re-quantize the weight or use the file it was saved with")

        if self.bits not in e8p_codebook.BITS:
            fail(f"bits must be one of {e8p_codebook.BITS}, got {self.bits}")
        if self.codebook not in e8p_codebook.VARIANTS:
            fail(f"codebook must be one of {e8p_codebook.VARIANTS}, got {self.codebook!r}")
        if self.in_features <= 0 or self.in_features % e8p_codebook.DIM:
            fail(f"in_features {self.in_features} is not a positive multiple of {e8p_codebook.DIM}")
        groups = (self.out_features, self.in_features // e8p_codebook.DIM)
        if getattr(self.qweight, "dtype", None) != np.uint16 or tuple(self.qweight.shape) != groups:
            fail(f"qweight must be uint16 {list(groups)}, got {getattr(self.qweight, 'dtype', None)} "
                 f"{list(getattr(self.qweight, 'shape', ()))}")
        second = SECOND_STAGE_DTYPE.get(self.bits)
        if second is None and self.qweight_2 is not None:
            fail("2 bits has one stage, but a qweight_2 was given")
        if second is not None and (self.qweight_2 is None or self.qweight_2.dtype != second
                                   or tuple(self.qweight_2.shape) != groups):
            fail(f"{self.bits} bits needs qweight_2 {np.dtype(second).name} {list(groups)}")
        n_stages = 1 if second is None else 2
        if self.stage_scales.dtype != np.float32 or tuple(self.stage_scales.shape) != (n_stages,):
            fail(f"stage_scales must be float32 [{n_stages}], got {self.stage_scales.dtype} "
                 f"{list(self.stage_scales.shape)}")
        for name, n in (("sign_in", self.in_features), ("sign_out", self.out_features)):
            a = getattr(self, name)
            if a.dtype != np.uint8 or tuple(a.shape) != (-(-n // 8),):
                fail(f"{name} must be uint8 [{-(-n // 8)}], got {a.dtype} {list(a.shape)}")
        if not is_cupy(self.stage_scales) and not np.isfinite(self.stage_scales).all():
            fail("stage_scales are not all finite")

    def decoded(self) -> np.ndarray:
        """Ŵ [out, in] float32, the codebook-decoded matrix between the transforms (NumPy)."""
        host = [to_numpy(c) for c in self.stage_codes]
        return decode_incoherent(host, self.host_scales, self.bits, self.codebook)

    def dequantize(self):
        """W [out, in] float32 = diag(s_out) Hₒᵀ Ŵ Hᵢ diag(s_in) (the NumPy reference; NumPy for CuPy arrays)."""
        signs_in, signs_out = to_numpy(self.signs_in), to_numpy(self.signs_out)
        return from_incoherent(self.decoded(), signs_in, signs_out)

    def matmul_reference(self, x) -> np.ndarray:
        """y [..., out] = x [..., in] @ W.T through the NumPy reference `dequantize`."""
        return np.asarray(x, dtype=np.float32) @ self.dequantize().T

    def matmul_reference_int8(self, x, levels: int | None = None) -> np.ndarray:
        """y [m, out] for x [m, in], the reference of the int8-activation paths: the rotated activation
        (x ⊙ s_in) Hᵢᵀ quantized as the integer kernels do (`quantize_activation`: one byte, Q8_0, in decode
        and in the integer prefill; `levels` another grid), times Ŵᵀ, rotated back."""
        x_rot = fast_hadamard(np.asarray(x, dtype=np.float32) * to_numpy(self.signs_in))  # [m, in]
        y_rot = quantize_activation(x_rot, None, levels) @ self.decoded().T  # [m, out]
        return fast_hadamard(y_rot, transpose=True) * to_numpy(self.signs_out)  # [m, out]

    def matmul_rows(self, x, on_gpu: bool):
        """y [m, out] = x [m, in] @ W.T: CUDA for CuPy input, Numba (fused or prefill) for NumPy input."""
        if on_gpu:
            from runtime.kernels import e8p_cuda
            return e8p_cuda.matmul(self, x)  # [m, out]
        from runtime.kernels import e8p_numba
        mode = activation_mode()[0]
        if self._int8_rows(mode, x.shape[0]):
            return e8p_numba.matmul_int8(self, x)  # [m, out]
        if x.shape[0] <= FUSED_MAX_ROWS:
            return e8p_numba.matmul_fused(self, x)  # [m, out]
        if mode == "int8" and e8p_numba.prefill_applies(self):  # in integers, Q8_0 activations
            return e8p_numba.matmul_prefill_vbmi(self, x)  # [m, out]
        return e8p_numba.matmul_prefill(self, x)  # [m, out]

    def _int8_rows(self, mode: str, rows: int) -> bool:
        """Whether `rows` rows on the CPU go through the int8 decode kernel under `mode`: one row under `int8`,
        any number under `int8-all`, where the kernel has this tensor's codes."""
        from runtime.kernels import e8p_numba
        return (mode == "int8-all" or (mode == "int8" and rows == 1)) and e8p_numba.int8_applies(self)

    def one_row_product(self, parts):
        """PackedTensor.one_row_product for E8P parts on the CPU: the int8 decode call gathered once, one call
        for up to MAX_PARTS parts of one input size, bit width and codebook (their rotations in parallel), else
        one call per part; None under float activations."""
        from runtime.kernels import e8p_numba
        if not self._cpu_int8(parts):
            return None
        outs = [p.out_features for p in parts]
        if len(parts) > 1 and self._one_call(parts):
            call = e8p_numba.int8_parts_call(parts)
            return lambda x: e8p_numba.run_int8_parts(call, x, [np.empty(n, dtype=np.float32) for n in outs])
        calls = [e8p_numba.int8_call(p) for p in parts]
        return lambda x: [e8p_numba.run_int8(call, x, np.empty(n, dtype=np.float32)) for call, n in zip(calls, outs)]

    def prepared_call(self, parts):
        """PackedTensor.prepared_call for E8P parts of one input size, bit width and codebook on the CPU: the
        arguments of the int8 decode call (e8p_numba.int8_parts_call) where `one_row_product` runs that kernel,
        else None."""
        from runtime.kernels import e8p_numba
        return e8p_numba.int8_parts_call(parts) if self._cpu_int8(parts) and self._one_call(parts) else None

    @staticmethod
    def _cpu_int8(parts) -> bool:
        """Whether one-row products of all parts go through the CPU's int8 decode kernel (E8P tensors on the
        CPU, `_int8_rows` under the current activation mode)."""
        mode = activation_mode()[0]
        return all(isinstance(p, E8PTensor) and not is_cupy(p.qweight) and p._int8_rows(mode, 1) for p in parts)

    @staticmethod
    def _one_call(parts) -> bool:
        """Whether the parts fit one `_decode_int8_parts` call: up to MAX_PARTS of one input size, bit width and
        codebook."""
        from runtime.kernels import e8p_numba
        return len(parts) <= e8p_numba.MAX_PARTS and len({(p.in_features, p.bits, p.codebook) for p in parts}) == 1

    def tensors(self) -> dict:
        arrays = {"qweight": self.qweight, "stage_scales": self.stage_scales,
                  "sign_in": self.sign_in, "sign_out": self.sign_out}
        if self.qweight_2 is not None:
            arrays["qweight_2"] = self.qweight_2
        return arrays

    def meta(self) -> dict:
        meta = {"bits": self.bits, "in_features": self.in_features, "out_features": self.out_features,
                "hadamard_in": list(self.hadamard_in), "hadamard_out": list(self.hadamard_out)}
        if self.codebook != e8p_codebook.DEFAULT_VARIANT:
            meta["codebook"] = self.codebook
        return meta

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict) -> "E8PTensor":
        keys = ("bits", "in_features", "out_features", "hadamard_in", "hadamard_out")
        cls.require_meta(meta, keys)
        if meta["bits"] not in e8p_codebook.BITS:
            raise UserError(f"e8p tensor: metadata bits {meta['bits']!r} is not one of {e8p_codebook.BITS}; "
                            f"re-quantize the model")
        names = {"qweight", "stage_scales", "sign_in", "sign_out"} | ({"qweight_2"} if meta["bits"] > 2 else set())
        if set(tensors) != names:
            raise UserError(f"e8p tensor: arrays {sorted(tensors)} do not match the metadata (bits={meta['bits']} "
                            f"needs {sorted(names)}); the file is corrupt")
        packed = cls(**tensors, bits=meta["bits"], in_features=meta["in_features"],
                     codebook=meta.get("codebook", e8p_codebook.DEFAULT_VARIANT))
        saved = keys + (("codebook",) if packed.codebook != e8p_codebook.DEFAULT_VARIANT else ())
        return packed.check_stated(meta, saved, " (a file from a version with other Hadamard sizes?)")

    def to_device(self, xp) -> "E8PTensor":
        moved = {name: to_module(a, xp) for name, a in self.tensors().items()}
        return E8PTensor(**moved, bits=self.bits, in_features=self.in_features, codebook=self.codebook)
