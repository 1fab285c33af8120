"""LoRA adapters: load a PEFT adapter directory, apply it at run time or merge it.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
§4.1) adds a trained low-rank update to a frozen weight W [out, in]:

    y = x Wᵀ + s · (x Aᵀ) Bᵀ        A [r, in], B [out, r], s = lora_alpha / r

(rsLoRA, Kalajdzievski 2023, uses s = lora_alpha / sqrt(r)). QLoRA
(Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", §3)
keeps W quantized (NF4) and runs the two small float matrices beside it;
`apply_lora` does the same for any base weight, float or packed, by wrapping
it in a `LoraWeight`, whose `matmul` the forward pass calls through
`runtime.linear.linear`. `merge_lora` instead folds the update into float
weights, W' = W + s · B A (Hu et al. §4.1: no extra latency), so the merged
model can then be quantized like any checkpoint.

An adapter directory is what PEFT's `save_pretrained` writes:

    adapter_config.json        {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                "target_modules": [...], "use_rslora": false, ...}
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight  [r, in]
                               base_model.model.<module>.lora_B.weight  [out, r]
    (or adapter_model.bin, the same state dict saved by torch.save, read
    without running its pickle: runtime/checkpoints/torch_pickle.py names the file it refuses)

`<module>` is the module's name in the HF model, so `<module>.weight` is the
checkpoint name this runtime keeps the base weight under, e.g.
`model.layers.0.self_attn.q_proj.weight` (Llama) or
`model.decoder.layers.0.fc1.weight` (OPT). Factors holding NaN or infinity
are refused when the adapter loads, before they could poison the logits.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.checkpoints.checkpoint import read_json, read_weight_file
from runtime.errors import UserError
from runtime.linear import linear

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
KEY_PREFIX = "base_model.model."
KEY_PATTERN = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")
# adapter_config.json settings that change what the adapter computes and that this module does not
# implement: a true / non-empty value is refused (false, null, {} and [] are fine).
UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "lora_bias": "lora_bias (a trained bias on lora_B)",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D layout)",
    "alpha_pattern": "alpha_pattern (a different lora_alpha per module)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "use_qalora": "QALoRA",
    "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}
# init_lora_weights values that start from the plain base weights: others (pissa, olora, loftq,
# corda, eva, ...) subtract the initial adapter from the base, so the adapter needs that other base.
PLAIN_INITS = (True, False, "gaussian")


@dataclass
class LoraFactors:
    """The trained update of one weight: W [out, in] gains scale · B @ A."""
    A: np.ndarray  # [r, in] float32
    B: np.ndarray  # [out, r] float32
    scale: float


@dataclass
class LoraAdapter:
    """A loaded adapter: the update of each targeted weight, keyed by its checkpoint name."""
    path: Path
    base_model: str | None  # base_model_name_or_path from adapter_config.json, for messages
    factors: dict[str, LoraFactors]

    def mismatch(self, what: str) -> UserError:
        """The error for an adapter that does not fit the model: what was wrong and which base it wants."""
        base = f" (trained on {self.base_model})" if self.base_model else ""
        return UserError(f"LoRA adapter {self.path}{base} does not fit this model: {what}; "
                         f"use the adapter made for this base model")


class LoraWeight:
    """A base weight (float array or packed tensor) with a LoRA update run beside it (QLoRA §3)."""

    def __init__(self, base, A, B, scale: float):
        self.base = base  # [out, in] float array or PackedTensor
        self.A = A  # [r, in]
        self.B_scaled = B * np.float32(scale)  # [out, r]: the scale folded in once

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the base weight."""
        return tuple(self.base.shape)

    def matmul(self, x):
        """y [..., out] = x [..., in] @ W.T + scale · (x @ A.T) @ B.T."""
        down = x @ self.A.T  # [..., r]
        return linear(x, self.base) + down @ self.B_scaled.T  # [..., out]

    def to_device(self, xp) -> "LoraWeight":
        """A copy whose arrays (base included) live on the device of array module `xp`."""
        base = self.base.to_device(xp) if hasattr(self.base, "to_device") else xp.asarray(self.base)
        return LoraWeight(base, xp.asarray(self.A), xp.asarray(self.B_scaled), 1.0)


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json of the adapter directory `path`, checked for features we do not run."""
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{path} has no {CONFIG_FILE}: give a PEFT LoRA adapter directory "
                        f"(what save_pretrained writes)")
    config = read_json(config_path, "fix it or re-save the adapter")
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{config_path}: peft_type {config['peft_type']!r} is not supported, only LORA")
    for key, feature in UNSUPPORTED.items():
        if config.get(key):
            raise UserError(f"{config_path}: {feature} is not supported ({key}={config[key]!r}); "
                            f"use a plain LoRA adapter")
    if config.get("bias", "none") != "none":
        raise UserError(f"{config_path}: bias={config['bias']!r} (trained biases) is not supported; "
                        f"use an adapter trained with bias='none'")
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        raise UserError(f"{config_path}: init_lora_weights={config['init_lora_weights']!r} changes the base "
                        f"weights; convert the adapter to plain LoRA when saving it (PEFT "
                        f"path_initial_model_for_weight_conversion)")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise UserError(f"{config_path}: {key} must be a positive number, got {value!r}")
    return config


def read_adapter_weights(path: Path) -> dict[str, np.ndarray]:
    """The adapter's state dict (safetensors, else torch.save'd .bin)."""
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            tensors, _ = read_weight_file(path / name)
            return tensors
    raise UserError(f"{path} has no {' or '.join(WEIGHT_FILES)}: save the adapter with PEFT's save_pretrained")


def load_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory; UserError for anything missing, malformed or unsupported."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"LoRA adapter directory {path} does not exist; give the directory holding "
                        f"{CONFIG_FILE} and adapter_model.safetensors")
    config = read_adapter_config(path)
    tensors = read_adapter_weights(path)
    pairs = {}  # module -> {"A": [r, in], "B": [out, r]}
    for key, value in tensors.items():
        match = KEY_PATTERN.fullmatch(key.removeprefix(KEY_PREFIX))
        if match is None:
            raise UserError(f"{path}: tensor {key!r} is not a LoRA factor (lora_A / lora_B of a linear "
                            f"layer); embedding LoRA and other adapter types are not supported")
        pairs.setdefault(match["module"], {})[match["factor"]] = np.asarray(value, dtype=np.float32)
    if not pairs:
        raise UserError(f"{path}: the adapter holds no lora_A / lora_B weights; re-save it")
    factors = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise UserError(f"{path}: {module} has lora_{''.join(pair)} but not both lora_A and lora_B; "
                            f"the adapter file is incomplete, re-save it")
        A, B = pair["A"], pair["B"]  # [r, in], [out, r]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise UserError(f"{path}: {module} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, "
                            f"which are not [r, in] and [out, r]; the adapter file is corrupt")
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise UserError(f"{path}: {module}'s lora_A or lora_B holds NaN or infinite values (a diverged "
                            f"training run or a corrupt file); use a checkpoint of the adapter from before")
        rank = A.shape[0]
        if not config.get("rank_pattern") and rank != config["r"]:
            raise UserError(f"{path}: {module} has rank {rank} but {CONFIG_FILE} says r={config['r']}; "
                            f"the adapter files do not belong together")
        root = math.sqrt(rank) if config.get("use_rslora") else rank
        factors[f"{module}.weight"] = LoraFactors(A, B, config["lora_alpha"] / root)
    return LoraAdapter(path, config.get("base_model_name_or_path"), factors)


def check_fits(tensors: dict, adapter: LoraAdapter) -> None:
    """UserError unless every targeted weight exists in `tensors` with the adapter's shape."""
    for name, f in adapter.factors.items():
        if name not in tensors:
            raise adapter.mismatch(missing_weight(tensors, name))
        out_features, in_features = tensors[name].shape
        if f.A.shape[1] != in_features or f.B.shape[0] != out_features:
            raise adapter.mismatch(f"{name} is [{out_features}, {in_features}] but the adapter's update is "
                                   f"[{f.B.shape[0]}, {f.A.shape[1]}]")


def missing_weight(tensors: dict, name: str) -> str:
    """Why `name` is not in the model: a layer out of range, or a module the layers do not have."""
    match = re.fullmatch(r"(?P<stack>.*\.layers)\.(?P<index>\d+)\.(?P<rest>.+)", name)
    if match is None:
        return f"it targets {name.removesuffix('.weight')}, which the model lacks"
    stack = match["stack"]
    layers = {int(k[len(stack) + 1:].split(".", 1)[0]) for k in tensors if k.startswith(f"{stack}.")}
    if not layers:
        return f"it targets {name.removesuffix('.weight')} but the model has no {stack} (another architecture)"
    if int(match["index"]) not in layers:
        return f"it targets layer {match['index']} but the model has {len(layers)} layers"
    present = sorted(k[len(f"{stack}.{min(layers)}."):].removesuffix(".weight") for k in tensors
                     if k.startswith(f"{stack}.{min(layers)}.") and k.endswith(".weight"))
    return (f"it targets {match['rest'].removesuffix('.weight')}, which the model's layers lack "
            f"(they have {', '.join(present)})")


def apply_lora(tensors: dict, adapter: LoraAdapter) -> dict:
    """`tensors` with each targeted weight (float or packed) wrapped in a LoraWeight, for `Model`."""
    check_fits(tensors, adapter)
    out = dict(tensors)
    for name, f in adapter.factors.items():
        out[name] = LoraWeight(tensors[name], f.A, f.B, f.scale)
    return out


def merge_lora(tensors: dict, adapter: LoraAdapter) -> dict:
    """`tensors` with W + scale · B @ A (float32) for each targeted weight; the base must be float."""
    check_fits(tensors, adapter)
    out = dict(tensors)
    for name, f in adapter.factors.items():
        if not hasattr(tensors[name], "ndim"):
            raise UserError(f"cannot merge a LoRA adapter into the packed weight {name}: merge into the "
                            f"float checkpoint before quantizing, or apply the adapter at run time (--lora)")
        W = np.asarray(tensors[name], dtype=np.float32)  # [out, in]
        out[name] = W + np.float32(f.scale) * (f.B @ f.A)  # [out, in]
    return out
