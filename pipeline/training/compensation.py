"""Initial LoRA factors that cancel a quantized base's error (`train.py --init loftq|cloq`).

LoRA's own initialization (B = 0) starts training from the quantized model,
so the adapter spends its capacity and its steps first on undoing the
quantization error. Both initializations here start instead from

    s · B A ≈ W − Q        W the float weight [out, in], Q the base's dequantized one, s = alpha / r

- `loftq`: LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-aware Quantization
  for Large Language Models", Algorithm 1 with T = 1, the base kept as it is):
  the best rank-r approximation of W − Q in the Frobenius norm, its truncated
  SVD U_r S_r V_rᵀ (Eckart-Young).
- `cloq`: CLoQ (Deng et al. 2025, "CLoQ: Enhancing Fine-Tuning of Quantized
  LLMs via Calibrated LoRA Initialization", §3): the best rank-r
  approximation in the norm the layer's outputs see, ‖(W − Q − s B A) Xᵀ‖_F
  over calibration inputs X: with H = XᵀX (damped by 1% of its mean diagonal,
  as GPTQ), the truncated SVD of (W − Q) H^½ multiplied back by H^-½. The
  inputs X come layer by layer from the quantized model with the compensated
  layers before it (pipeline/calibration.py's passes, with the base's own
  tensors), from the first windows of the training data.

Either way the factors are split evenly, B = U_r √(S_r / s), A = √(S_r / s)
V_rᵀ (H^-½). The base is not changed: the adapter belongs to this quantized
model, and PEFT loads it onto the same one.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from model import Config, Model
from runtime.checkpoints.checkpoint import load_checkpoint, read_json
from runtime.errors import UserError
from runtime.formats.base import PackedTensor
from pipeline.calibration import calibrate
from pipeline.training.adapter import target_weight
from pipeline.training.backward import Adapter, dense
from pipeline.training.data import Dataset

INITS = ("lora", "loftq", "cloq")
CALIBRATION_WINDOWS = 32  # windows of the training data CLoQ's H is measured on
DAMPING = 0.01  # of H's mean diagonal, added to its diagonal (GPTQ's percdamp)


def float_base_of(path: Path) -> Path:
    """The float checkpoint the packed model at `path` was quantized from (its config's quantization
    record); UserError when the record does not name one that can serve."""
    record = read_json(Path(path) / "config.json").get("quantization") if Path(path).is_dir() else None
    if not isinstance(record, dict) or not record.get("base"):
        raise UserError(f"{path} does not record the float model it was quantized from: give that model's "
                        f"directory with --float-base")
    if record.get("lora_merged") or record.get("smoothing"):
        raise UserError(f"{path} was not quantized from the float weights as they are (an adapter merged or "
                        f"SmoothQuant scales): give the float weights it was quantized from with --float-base")
    base = Path(record["base"])
    if not base.is_dir():
        raise UserError(f"{path} was quantized from {base}, which is gone: give the float model with --float-base")
    return base


def whitening(H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H^½, H^-½) [in, in] float64 of H [in, in] damped by DAMPING of its mean diagonal."""
    H = np.asarray(H, dtype=np.float64)  # [in, in]
    damp = DAMPING * float(np.mean(np.diag(H)))
    values, vectors = np.linalg.eigh(H + (damp if damp > 0 else 1.0) * np.eye(len(H)))  # [in], [in, in]
    values = np.maximum(values, values.max() * 1e-12)
    return (vectors * np.sqrt(values)) @ vectors.T, (vectors / np.sqrt(values)) @ vectors.T


def low_rank_factors(residual: np.ndarray, rank: int, scale: float,
                     whiten: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A [rank, in], B [out, rank] float32 with scale · B A the best approximation of `residual` [out, in]
    of rank at most `rank`: in the Frobenius norm, or in ‖· H^½‖_F when `whiten` = (H^½, H^-½). Where the
    residual has a lower rank, the remaining rows of A and columns of B are zero."""
    R = np.asarray(residual, dtype=np.float64)  # [out, in]
    U, S, Vt = np.linalg.svd(R if whiten is None else R @ whiten[0], full_matrices=False)  # [out,k] [k] [k,in]
    r = min(rank, len(S))
    g = np.sqrt(S[:r] / scale)  # [r]
    A = np.zeros((rank, R.shape[1]), dtype=np.float32)  # [rank, in]
    B = np.zeros((R.shape[0], rank), dtype=np.float32)  # [out, rank]
    A[:r] = g[:, None] * (Vt[:r] if whiten is None else Vt[:r] @ whiten[1])
    B[:, :r] = U[:, :r] * g
    return A, B


def calibration_windows(dataset: Dataset, seqlen: int) -> np.ndarray:
    """[n, T] token windows for CLoQ's H: the training examples' inputs in file order, joined and cut into
    at most CALIBRATION_WINDOWS windows of `seqlen` (one shorter window when they hold fewer tokens)."""
    tokens = np.concatenate([inputs for inputs, _ in dataset.examples])[:CALIBRATION_WINDOWS * seqlen]  # [N]
    n = max(1, len(tokens) // seqlen)
    T = min(seqlen, len(tokens))
    return tokens[:n * T].reshape(n, T)  # [n, T]


def _loftq(adapter: Adapter, model: Model, tensors: dict) -> None:
    """Fill `adapter` with the LoftQ factors of every target."""
    for name in adapter.names():
        residual = np.asarray(tensors[name], dtype=np.float32) - dense(target_weight(model, name))  # [out, in]
        adapter.A[name][...], adapter.B[name][...] = low_rank_factors(residual, adapter.rank, adapter.scale)


def _cloq(adapter: Adapter, model: Model, config: Config, tensors: dict, windows: np.ndarray,
          progress: bool) -> None:
    """Fill `adapter` with the CLoQ factors of every target, layer by layer on `windows` [n, T]."""

    def method(names, weights, H):  # pipeline/calibration.py's GroupMethod, with the float weights seen
        whiten = whitening(H)
        results = []
        for name, W in zip(names, weights):
            packed = target_weight(model, name)
            Q = dense(packed)  # [out, in]
            if name in adapter.A:
                adapter.A[name][...], adapter.B[name][...] = low_rank_factors(W - Q, adapter.rank, adapter.scale,
                                                                              whiten)
                Q = Q + np.float32(adapter.scale) * (adapter.B[name] @ adapter.A[name])  # [out, in]
            results.append((packed, {}, Q))
        return results

    with tempfile.TemporaryDirectory(prefix="qllm-cloq-") as work:
        calibrate(config, tensors, method, windows, Path(work) / "state", {"init": "cloq"}, progress=progress)


def compensate(adapter: Adapter, model: Model, init: str, float_base: Path, dataset: Dataset, seqlen: int,
               progress: bool = True) -> None:
    """Replace `adapter`'s factors by the `init` ("loftq" or "cloq") ones of the quantized `model`, whose float
    weights are the checkpoint `float_base`; UserError when the base is not quantized or does not match."""
    if not any(isinstance(target_weight(model, name), PackedTensor) for name in adapter.names()):
        raise UserError(f"--init {init} starts the adapter from the base's quantization error, and this base is "
                        f"not quantized: train a float base with --init lora")
    hf_config, tensors = load_checkpoint(float_base)
    for name in adapter.names():
        if name not in tensors or tuple(tensors[name].shape) != tuple(target_weight(model, name).shape):
            raise UserError(f"--float-base {float_base} does not match the base: its {name} is "
                            f"{list(tensors[name].shape) if name in tensors else 'missing'}, the base's "
                            f"{list(target_weight(model, name).shape)}; give the float model it was quantized from")
    if init == "loftq":
        _loftq(adapter, model, tensors)
    else:
        _cloq(adapter, model, Config.from_hf(hf_config), tensors, calibration_windows(dataset, seqlen), progress)
