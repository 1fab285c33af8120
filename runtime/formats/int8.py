"""The int8 format: W8A8 integer matmul with optional float outlier columns.

The run-time side of LLM.int8() (Dettmers, Lewis, Belkada, Zettlemoyer 2022,
"LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", §3) and
of SmoothQuant's W8A8 (Xiao et al. 2023, §4; its smoothing is folded into the
weights and norms offline, so nothing of it is stored here).

Stored (symmetric absmax quantization, no zero points):

    qweight  int8    [out, in]   row-major, one byte per weight, in [-127, 127]
    scales   float32 [out]       "row" (vector-wise): max_i |W[o, i]| / 127
             float32 [1]         "tensor" (absmax8): max |W| / 127

    W[o, i] ~ qweight[o, i] * scales[o]          (scales[0] for "tensor")

Bits per weight from the stored bytes (N = out * in):

    row:     8 + 32 / in         = 8.056 at in = 576
    tensor:  8 + 32 / N

Activations are quantized at run time, never stored (`quantize_activations`):
per token ("token": one scale per row of x, absmax / 127) or per tensor
("tensor": one scale for all of x), rounded to nearest (ties to even),
multiplied with int32 accumulation:

    y[r, o] = float32(sum_i xq[r, i] * qweight[o, i]) * sx[r] * sw[o]

(float32 products in that order; the integer kernels equal this exactly).

Mixed-precision decomposition (LLM.int8 §3.2), on when `outlier_threshold`
is set: the input features j with |x[r, j]| >= threshold for some row r of
the current batch go through a float product, the rest through int8 (those
columns are zeroed before the activation scales are taken):

    y = int8_part(x with outlier columns zeroed) + x[:, cols] @ Wf[:, cols].T

The float weight columns Wf[:, cols] are the int8 columns dequantized,
qweight[:, cols] * scales, which is what bitsandbytes does with its int8
weights. Trade-off: no extra bytes and any column can become an outlier in
any batch; the price is the weight's own 8-bit rounding error on those
columns (small: weights have no outliers; the large error LLM.int8 removes
comes from quantizing the outlier activations). Keeping float16 copies of
all columns would cost 16 more bits per weight.
"""
from __future__ import annotations

import math

import numpy as np

from runtime.device import array_module_of, is_cupy, to_module
from runtime.errors import UserError
from runtime.formats.base import PackedTensor, activation_mode

QMAX = 127
GRANULARITIES = ("row", "tensor")  # weight scales
ACTIVATIONS = ("token", "tensor")  # activation scales
MAX_IN = (2**31 - 1) // (QMAX * QMAX)  # int32 accumulation cannot overflow below this many inputs
FUSED_MAX_ROWS = 4  # NumPy input with at most this many rows: decode kernel; more: blocked prefill kernel (not tuned)


def absmax_scale(absmax):
    """Scale absmax / 127 (float32), 1 where absmax is 0 (all-zero rows quantize to 0)."""
    absmax = np.asarray(absmax, dtype=np.float32)
    return np.where(absmax > 0, absmax / np.float32(QMAX), np.float32(1.0)).astype(np.float32)


def outlier_columns(x, threshold: float | None):
    """Boolean mask [in] of the input features with |x| >= threshold in some row of x [m, in] (NumPy or CuPy)."""
    xp = array_module_of(x)
    if threshold is None:
        return xp.zeros(x.shape[1], dtype=bool)
    return (xp.abs(x) >= xp.float32(threshold)).any(axis=0)  # [in]


def quantize_activations(x: np.ndarray, activation: str, outliers: np.ndarray):
    """x [m, in] float32 -> (xq [m, in] int8, sx [m] float32): absmax per token or per tensor.

    Outlier columns (mask [in]) are zeroed first, so they neither set a scale
    nor enter the int8 product. xq = rint(x / sx), ties to even.
    """
    inliers = np.where(outliers[None, :], np.float32(0.0), x)  # [m, in]
    absmax = np.abs(inliers).max(axis=1, initial=0.0)  # [m]
    if activation == "tensor":
        absmax = np.full_like(absmax, absmax.max(initial=0.0))  # [m]
    sx = absmax_scale(absmax)  # [m]
    xq = np.rint(inliers / sx[:, None]).astype(np.int8)  # [m, in]
    return xq, sx


class Int8Tensor(PackedTensor):
    """W [out, in] as int8 with per-row (or one) float32 scale; int8 activations at run time."""

    FORMAT = "int8"

    def __init__(self, qweight, scales, weight_scales: str = "row", activation: str = "token",
                 outlier_threshold: float | None = None):
        """Wrap the arrays (layout in the module docstring); UserError when they do not fit together.

        weight_scales: "row" (scales [out]) or "tensor" (scales [1]);
        activation: "token" or "tensor" activation scales; outlier_threshold:
        None (no decomposition) or a float >= 0 (LLM.int8 uses 6.0).
        """
        self.qweight = qweight  # [out, in] int8
        self.scales = scales  # [out] or [1] float32
        self.granularity = weight_scales
        self.activation = activation
        self.outlier_threshold = None if outlier_threshold is None else float(outlier_threshold)
        self._check()
        self._row_scales = None if is_cupy(scales) else np.ascontiguousarray(self.weight_scales())  # [out]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.qweight.shape[0]), int(self.qweight.shape[1])

    def _check(self):
        def fail(what):
            raise UserError(f"int8 tensor: {what}; re-quantize the weight or use the file it was saved with")

        if self.qweight.ndim != 2 or self.qweight.dtype != np.int8:
            fail(f"qweight must be int8 [out, in], got {self.qweight.dtype} {tuple(self.qweight.shape)}")
        n_out, n_in = self.shape
        if n_in > MAX_IN:
            fail(f"in_features {n_in} exceeds {MAX_IN}, where int32 accumulation could overflow")
        if self.granularity not in GRANULARITIES:
            fail(f"weight scales {self.granularity!r} unknown (one of {', '.join(GRANULARITIES)})")
        n_scales = n_out if self.granularity == "row" else 1
        if self.scales.dtype != np.float32 or self.scales.shape != (n_scales,):
            fail(f"{self.granularity} scales must be float32 [{n_scales}], "
                 f"got {self.scales.dtype} {tuple(self.scales.shape)}")
        if self.activation not in ACTIVATIONS:
            fail(f"activation scales {self.activation!r} unknown (one of {', '.join(ACTIVATIONS)})")
        t = self.outlier_threshold
        if t is not None and not (math.isfinite(t) and t >= 0):
            fail(f"outlier_threshold {t} must be a finite number >= 0 (or null for no decomposition)")

    def weight_scales(self):
        """Scale of every output row [out] float32 (the one scale repeated for "tensor")."""
        return array_module_of(self.scales).broadcast_to(self.scales, (self.shape[0],))  # [out]

    def dequantize(self):
        """W [out, in] float32 = qweight * scale of its row."""
        return self.qweight.astype(np.float32) * self.weight_scales()[:, None]  # [out, in]

    def outlier_product(self, x, outliers):
        """x[:, cols] @ Wf[:, cols].T [m, out] float32, Wf the dequantized int8 columns (zeros if none)."""
        xp = array_module_of(self.qweight)
        cols = xp.flatnonzero(outliers)  # [k]
        if cols.size == 0:
            return None
        w_cols = self.qweight[:, cols].astype(xp.float32) * self.weight_scales()[:, None]  # [out, k]
        return x[:, cols] @ w_cols.T  # [m, out]

    def matmul_reference(self, x) -> np.ndarray:
        """y [m, out] for x [m, in]: the format's definition in NumPy (integer matmul, exact)."""
        x = np.ascontiguousarray(x, dtype=np.float32)  # [m, in]
        outliers = outlier_columns(x, self.outlier_threshold)  # [in]
        xq, sx = quantize_activations(x, self.activation, outliers)
        acc = xq.astype(np.int32) @ self.qweight.astype(np.int32).T  # [m, out] exact
        y = acc.astype(np.float32) * sx[:, None] * self.weight_scales()[None, :]  # [m, out]
        extra = self.outlier_product(x, outliers)
        return y if extra is None else y + extra

    def matmul_rows(self, x2, on_gpu: bool):
        """y [m, out] = x [m, in] @ W.T in W8A8: CUDA for CuPy input, Numba for NumPy input."""
        if on_gpu:
            from runtime.kernels import int8_cuda
            return int8_cuda.matmul(self, x2)  # [m, out]
        from runtime.kernels import int8_numba
        if x2.shape[0] == 1:
            y = int8_numba.matvec(self.qweight, self._row_scales, x2[0], self.outlier_threshold,
                                  activation_mode()[1])  # [out]
            return y[None]
        outliers = outlier_columns(x2, self.outlier_threshold)  # [in]
        xq, sx = int8_numba.quantize_tokens(x2, outliers, self.activation == "tensor")
        if x2.shape[0] <= FUSED_MAX_ROWS:
            acc = int8_numba.int_matmul_decode(self.qweight, xq)  # [m, out]
        else:
            acc = int8_numba.int_matmul_prefill(self.qweight, xq, activation_mode()[1])  # [m, out]
        y = int8_numba.apply_scales(acc, sx, self._row_scales)  # [m, out]
        extra = self.outlier_product(x2, outliers)
        if extra is not None:
            y += extra
        return y

    def one_row_product(self, parts):
        """PackedTensor.one_row_product for int8 parts on the CPU: each part's one-row W8A8 product (as
        `matmul_rows`) with the kernel chosen once (`prepared_call`)."""
        calls = self.prepared_call(parts)
        if calls is None:
            return None
        from runtime.kernels import int8_numba
        return lambda x: [int8_numba.run(call, x) for call in calls]

    def prepared_call(self, parts):
        """PackedTensor.prepared_call for int8 parts on the CPU: each part's int8_numba `matvec_arguments`, or
        None where the parts are not all int8 tensors on the CPU."""
        if not all(isinstance(p, type(self)) and p._row_scales is not None for p in parts):
            return None
        from runtime.kernels import int8_numba
        kernel = activation_mode()[1]
        return [int8_numba.matvec_arguments(p.qweight, p._row_scales, p.outlier_threshold, kernel) for p in parts]

    def tensors(self) -> dict:
        return {"qweight": self.qweight, "scales": self.scales}

    def meta(self) -> dict:
        return {"shape": list(self.shape), "weight_scales": self.granularity, "activation": self.activation,
                "outlier_threshold": self.outlier_threshold}

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict) -> "Int8Tensor":
        if set(tensors) != {"qweight", "scales"}:
            raise UserError(f"int8 tensor: arrays {sorted(tensors)} do not match the format "
                            f"(needs ['qweight', 'scales']); the file is corrupt")
        if "shape" not in meta:
            raise UserError("int8 tensor: metadata lacks a shape; the file is corrupt")
        threshold = meta.get("outlier_threshold")
        if threshold is not None and not isinstance(threshold, (int, float)):
            raise UserError(f"int8 tensor: outlier_threshold {threshold!r} is not a number; the file is corrupt")
        packed = cls(tensors["qweight"], tensors["scales"], meta.get("weight_scales"), meta.get("activation"),
                     threshold)
        if list(packed.shape) != list(meta["shape"]):
            raise UserError(f"int8 tensor: metadata shape {meta['shape']} does not match the arrays' "
                            f"{list(packed.shape)}; the file is corrupt")
        return packed

    def to_device(self, xp) -> "Int8Tensor":
        return Int8Tensor(to_module(self.qweight, xp), to_module(self.scales, xp), self.granularity, self.activation,
                          self.outlier_threshold)
