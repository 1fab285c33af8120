"""Load quantized checkpoints written by other libraries into this project's packed formats.

A Hugging Face model directory whose config.json has a `quantization_config`
(or that has a `quantize_config.json` beside it, as AutoGPTQ writes) or a
`quip_params` section (QuIP#'s hfize script) holds packed weights of one of
these layouts; each has its own module, which turns the stored arrays into a
format of runtime/formats without re-quantizing:

    quant_method "gptq"          AutoGPTQ / GPTQModel / optimum   -> uniform   (importers/gptq.py)
    quant_method "awq"           AutoAWQ GEMM                     -> uniform   (importers/awq.py)
    quant_method "bitsandbytes"  transformers + bitsandbytes      -> lut4, int8 (importers/bitsandbytes.py)
    quip_params                  quip-sharp (QuIP#) E8P12, RVQ    -> e8p       (importers/quipsharp.py)

Every other quantization method, and every option a module cannot map
exactly, is refused with one line naming it. The result is what
`runtime.checkpoints.checkpoint.load_checkpoint` returns for a float model: an HF config
and {HF name: array or PackedTensor}, float arrays as float32, checked
against the config (runtime.checkpoints.config_schema) before it is returned.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np

from runtime.checkpoints.checkpoint import as_float32, hf_names, load_directory, read_json
from runtime.checkpoints.config_schema import check_tensors
from runtime.checkpoints.content_hash import run_pending
from runtime.errors import UserError
from runtime.formats.base import PackedTensor

IMPORTERS = {"gptq": "runtime.checkpoints.importers.gptq", "awq": "runtime.checkpoints.importers.awq",
             "bitsandbytes": "runtime.checkpoints.importers.bitsandbytes", "quip#": "runtime.checkpoints.importers.quipsharp"}
QUANTIZE_CONFIG = "quantize_config.json"  # AutoGPTQ's file beside config.json


def quantization_config(directory: Path) -> dict | None:
    """The quantization settings of an HF directory: config.json's `quantization_config`, AutoGPTQ's
    quantize_config.json, or QuIP#'s `quip_params` (as {"quant_method": "quip#", ...}); None if none."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not directory.is_dir() or not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the float loader reports a broken config.json in its own words
    if not isinstance(config, dict):
        return None
    if "quantization_config" in config:
        return require_object(config["quantization_config"], f"{config_path}: quantization_config")
    if "quip_params" in config:
        return {"quant_method": "quip#", **require_object(config["quip_params"], f"{config_path}: quip_params")}
    if (directory / QUANTIZE_CONFIG).is_file():
        return read_json(directory / QUANTIZE_CONFIG, "fix it or re-download the model")
    return None


def require_object(value, what: str) -> dict:
    """`value` when it is a JSON object; UserError naming `what` otherwise."""
    if not isinstance(value, dict):
        raise UserError(f"{what} is {type(value).__name__}, not an object; fix it or re-download the model")
    return value


def is_quantized_checkpoint(path) -> bool:
    """True when `path` is an HF directory holding another library's quantized weights."""
    return quantization_config(Path(path)) is not None


def importer(settings: dict, source: str):
    """The module that reads the layout `settings` (a quantization config) describes; UserError if none."""
    method = settings.get("quant_method", "gptq" if "bits" in settings else None)  # quantize_config.json
    if method not in IMPORTERS:
        raise UserError(f"{source}: quant_method {method!r} is not supported; this runtime imports "
                        f"{', '.join(IMPORTERS)} checkpoints (QuIP# through quip_params)")
    return importlib.import_module(IMPORTERS[method])


def load_quantized_checkpoint(path, dequantize: bool = False) -> tuple[dict, dict]:
    """(HF config, {HF name: float32 array or PackedTensor}) of another library's quantized checkpoint.

    `dequantize` returns every packed weight as its float32 matrix instead (to re-quantize it)."""
    directory = Path(path)
    settings = quantization_config(directory)
    source = str(directory / "config.json")
    if settings is None:
        raise UserError(f"{directory} holds no quantization_config; load it as a float checkpoint")
    config, raw, _ = load_directory(directory)
    tensors = importer(settings, source).convert(config, settings, hf_names(dict(raw)), source)
    config = {k: v for k, v in config.items() if k not in ("quantization_config", "quip_params")}
    result = {}
    for name, value in tensors.items():
        if isinstance(value, PackedTensor):
            result[name] = value.dequantize() if dequantize else value
        else:
            run_pending(value)
            result[name] = as_float32(np.asarray(value))
    check_tensors(config, result, str(directory), source)
    return config, result


def take_module(tensors: dict, prefix: str, parts, source: str, optional=()) -> dict:
    """{part: array} of the module `prefix` (e.g. "model.layers.0.mlp.up_proj"), removed from `tensors`;
    UserError naming the first of `parts` that is missing (those of `optional` may be)."""
    found = {}
    for part in (*parts, *optional):
        name = f"{prefix}.{part}"
        if name in tensors:
            found[part] = tensors.pop(name)
        elif part in parts:
            raise UserError(f"{source}: tensor {name!r} is missing; the checkpoint is incomplete: re-download it")
    return found


def packed_modules(tensors: dict, marker: str) -> list[str]:
    """Names of the modules (prefixes) that hold an array `<prefix>.<marker>`, in sorted order."""
    suffix = "." + marker
    return sorted(name[:-len(suffix)] for name in tensors if name.endswith(suffix))


def require_shape(array, shape: tuple, dtype, name: str, source: str) -> np.ndarray:
    """`array` as a NumPy array when it has `shape` and `dtype`; one-line UserError otherwise."""
    array = np.asarray(array)
    if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
        raise UserError(f"{source}: tensor {name!r} is {array.dtype} {list(array.shape)}, but the quantization "
                        f"config implies {np.dtype(dtype).name} {list(shape)}; the checkpoint is damaged or "
                        f"its config is wrong")
    return array


def setting(settings: dict, key: str, kind, allowed, default, source: str):
    """settings[key] (default when absent or null) when it is of `kind` and in `allowed` (None: any);
    UserError naming the key and the supported values otherwise."""
    value = settings.get(key)
    value = default if value is None else value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)) or \
            (allowed is not None and value not in allowed):
        supported = "" if allowed is None else f" (supported: {', '.join(map(str, allowed))})"
        raise UserError(f"{source}: quantization setting {key}={value!r} is not supported{supported}")
    return value
