"""A new LoRA adapter for training, and saving it as the PEFT directory runtime/lora.py and PEFT read.

Initialization follows LoRA (Hu et al. 2021, §4.1) as PEFT implements it: A
drawn from Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)),
and B = 0, so training starts from the base model's own outputs (QLoRA,
Dettmers et al. 2023, trains the same adapters over a quantized base).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model import Model
from runtime.checkpoints.atomic import write_text
from runtime.errors import UserError
from runtime.lora import CONFIG_FILE, KEY_PREFIX
from runtime.checkpoints.safetensors_io import write_safetensors
from pipeline.training.backward import PROJECTIONS, Adapter, layer_prefix

WEIGHT_FILE = "adapter_model.safetensors"


def module_names(model: Model) -> list:
    """The module names (q_proj, ..., fc1, ...) of every projection of one layer: the default targets."""
    return [m.rsplit(".", 1)[-1] for m in PROJECTIONS[model.config.arch]]


def target_names(model: Model, targets: list) -> list:
    """Checkpoint names of the weights the module names `targets` (q_proj, ...) select in every layer;
    UserError naming a target that no projection of the model has."""
    modules = PROJECTIONS[model.config.arch]
    names = []
    for target in targets:
        chosen = [m for m in modules if m.rsplit(".", 1)[-1] == target]
        if not chosen:
            raise UserError(f"--targets: the model has no {target!r} projection; choose among "
                            f"{', '.join(module_names(model))}")
        names += [f"{layer_prefix(model, i)}{m}.weight" for i in range(model.config.n_layers) for m in chosen]
    return sorted(set(names))


def target_weight(model: Model, name: str):
    """The model's own weight (float or packed) of checkpoint name `name` (layer i's "<module>.weight")."""
    i = int(name.split(".layers.", 1)[1].split(".", 1)[0])
    return model.layers[i][name.removeprefix(layer_prefix(model, i))]


def new_adapter(model: Model, targets: list, rank: int, alpha: float, rng: np.random.Generator) -> Adapter:
    """Fresh factors for `targets`: A ~ U(-1/sqrt(in), 1/sqrt(in)) [r, in], B = 0 [out, r]."""
    A, B = {}, {}
    for name in target_names(model, targets):
        n_out, n_in = target_weight(model, name).shape
        bound = 1 / np.sqrt(n_in)
        A[name] = rng.uniform(-bound, bound, (rank, n_in)).astype(np.float32)  # [r, in]
        B[name] = np.zeros((n_out, rank), dtype=np.float32)  # [out, r]
    return Adapter(A, B, rank, float(alpha), list(targets))


def adapter_tensors(adapter: Adapter) -> dict:
    """The PEFT state dict: base_model.model.<module>.lora_A.weight [r, in] and lora_B.weight [out, r]."""
    tensors = {}
    for name in adapter.names():
        module = name.removesuffix(".weight")
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = adapter.A[name]  # [r, in]
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = adapter.B[name]  # [out, r]
    return tensors


def adapter_config(adapter: Adapter, base_model: str, dropout: float) -> dict:
    """adapter_config.json as PEFT's save_pretrained writes it for a plain LoRA."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": dropout,
            "target_modules": sorted(adapter.targets), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None}


def write_adapter(directory: Path, adapter: Adapter, base_model: str, dropout: float) -> None:
    """Write (each atomically) adapter_config.json and adapter_model.safetensors into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    write_text(directory / CONFIG_FILE, json.dumps(adapter_config(adapter, base_model, dropout), indent=2) + "\n")
    write_safetensors(directory / WEIGHT_FILE, adapter_tensors(adapter))
