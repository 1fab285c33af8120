"""LLM.int8() and SmoothQuant: 8-bit weights and 8-bit activations (W8A8).

Three methods, one format (`Int8Tensor`, runtime/formats/int8.py), pure NumPy:

- LLM.int8() (Dettmers, Lewis, Belkada, Zettlemoyer 2022, "LLM.int8(): 8-bit
  Matrix Multiplication for Transformers at Scale", §3):
  vector-wise quantization (§3.1: one absmax scale per weight row, one per
  token of the activations) plus the mixed-precision decomposition (§3.2):
  at run time the input features whose magnitude reaches the threshold
  (6.0) anywhere in the current batch are multiplied in float, the rest in
  int8. `Int8Params()` / tag `int8`.
- Naive absmax int8 (§3 "Absmax quantization", the baseline the paper shows
  degrading): one scale for the whole weight and one for the whole
  activation tensor, no decomposition. `ABSMAX8` / tag `absmax8`.
- SmoothQuant (Xiao, Lin, Seznec, Wu, Demouth, Han 2023, "SmoothQuant:
  Accurate and Efficient Post-Training Quantization for Large Language
  Models", §4): per input channel j, s_j = max|X_j|^α / max|W_j|^(1-α)
  (`smoothing_factors`, α = 0.5) moves the activation outliers into the
  weights: X diag(s)^-1 · diag(s) Wᵀ = X Wᵀ. The division is folded offline
  into the preceding norm (pipeline/smoothing.py), the multiplication into
  the weights; the smoothed weights are then quantized per row with
  per-token activation scales (`SMOOTH8` / tag `smooth8`; the paper's
  "O1"-style dynamic per-token setting, not its static per-tensor O3).

Symmetric absmax quantization throughout: q = round(w / s), s = absmax / 127.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from runtime.errors import UserError
from runtime.formats.int8 import ACTIVATIONS, GRANULARITIES, Int8Tensor, QMAX, absmax_scale
from runtime.method_contract import MethodContract, Option, QuantSpec

LLM_INT8_THRESHOLD = 6.0  # LLM.int8 §3.2: outlier features have magnitude >= 6
SMOOTHQUANT_ALPHA = 0.5  # SmoothQuant §4: migration strength
MIN_SMOOTHING = 1e-5  # floor on s_j, as the SmoothQuant reference clamps it (dead channels)


@dataclass
class Int8Params:
    """weight_scales: "row" (vector-wise) or "tensor"; activation: "token" or "tensor" scales;
    outlier_threshold: LLM.int8's decomposition threshold, None for plain W8A8."""

    weight_scales: str = "row"
    activation: str = "token"
    outlier_threshold: float | None = LLM_INT8_THRESHOLD

    def check(self) -> None:
        """UserError unless the scale granularities are known and the threshold, if any, positive."""
        if self.weight_scales not in GRANULARITIES or self.activation not in ACTIVATIONS:
            raise UserError(f"int8: weight_scales must be one of {GRANULARITIES} and activation one of "
                            f"{ACTIVATIONS}, got {self.weight_scales!r}, {self.activation!r}")
        if self.outlier_threshold is not None and not self.outlier_threshold > 0:
            raise UserError(f"int8: the outlier threshold must be positive, got {self.outlier_threshold}")


LLM_INT8 = Int8Params()
ABSMAX8 = Int8Params(weight_scales="tensor", activation="tensor", outlier_threshold=None)
SMOOTH8 = Int8Params(weight_scales="row", activation="token", outlier_threshold=None)


def from_tag(spec: QuantSpec) -> Int8Params:
    """The parameters a tag asks for: int8 (tN: outlier threshold N/100), absmax8 or smooth8."""
    params = {"int": LLM_INT8, "absmax": ABSMAX8, "smooth": SMOOTH8}[spec.method]
    if "t" in spec.values:
        return dataclasses.replace(params, outlier_threshold=spec.values["t"] / 100)
    return params


def quantize(W: np.ndarray, params: Int8Params | None = None) -> Int8Tensor:
    """W [out, in] float -> Int8Tensor: q = rint(W / s), s = absmax / 127 per row or per tensor."""
    params = params or Int8Params()
    params.check()
    W = np.asarray(W, dtype=np.float32)
    if W.ndim != 2:
        raise UserError(f"int8: expected a weight matrix [out, in], got shape {W.shape}")
    if not np.isfinite(W).all():
        raise UserError("int8: the weight contains inf or NaN; fix the checkpoint before quantizing")
    if params.weight_scales == "row":
        absmax = np.abs(W).max(axis=1, initial=0.0)  # [out]
    else:
        absmax = np.array([np.abs(W).max(initial=0.0)], dtype=np.float32)  # [1]
    scales = absmax_scale(absmax)  # [out] or [1]
    rows = scales if params.weight_scales == "row" else np.broadcast_to(scales, (W.shape[0],))  # [out]
    qweight = np.clip(np.rint(W / rows[:, None]), -QMAX, QMAX).astype(np.int8)  # [out, in]
    return Int8Tensor(qweight, scales, params.weight_scales, params.activation, params.outlier_threshold)


def smoothing_factors(act_absmax: np.ndarray, weight_absmax: np.ndarray,
                      alpha: float = SMOOTHQUANT_ALPHA) -> np.ndarray:
    """SmoothQuant §4, Eq. 4: s_j = max|X_j|^α / max|W_j|^(1-α) per input channel j, float32 [in].

    act_absmax [in]: max |X_j| over the calibration tokens; weight_absmax
    [in]: max |W_ij| over the output rows of every linear that reads X
    (q, k and v together, as the reference does). As the reference code,
    max|W_j| and s_j are floored at MIN_SMOOTHING, so no factor is 0 or inf.
    """
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"smoothquant: alpha must lie in [0, 1] (the paper uses 0.5), got {alpha}")
    act = np.asarray(act_absmax, dtype=np.float64)  # [in]
    weight = np.maximum(np.asarray(weight_absmax, dtype=np.float64), MIN_SMOOTHING)  # [in]
    return np.maximum(act**alpha / weight ** (1.0 - alpha), MIN_SMOOTHING).astype(np.float32)  # [in]


CONTRACTS = (
    MethodContract("int", "LLM.int8(): vector-wise W8A8 with the outlier decomposition", bits=(8,), params=from_tag,
                   quantize=quantize, examples=("int8", "int8t150"),
                   options=(Option("t", "--outlier-threshold", "LLM.int8's outlier threshold, in steps of 0.01",
                                   field="outlier_threshold", scale=100),)),
    MethodContract("absmax", "naive W8A8: one scale per weight and per activation tensor", bits=(8,),
                   params=from_tag, quantize=quantize, examples=("absmax8",)),
    MethodContract("smooth", "SmoothQuant, then per-row / per-token W8A8", bits=(8,), params=from_tag,
                   quantize=quantize, examples=("smooth8",), calibration="activations"),
)
