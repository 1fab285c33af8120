"""Write this project's quantized models in layouts other tools load: GPTQ checkpoints and GGUF files.

    export_model(model_dir, "gptq", out)   uniform-format model -> GPTQ directory (runtime/checkpoints/export/gptq.py)
    export_model(model_dir, "gguf", out)   uniform 4/8-bit model -> GGUF file llama.cpp runs (runtime/checkpoints/export/gguf.py)

`model_dir` is a model quantize.py wrote (config.json with a `quantization`
section, packed model.safetensors). What a layout cannot hold is refused
with one line listing what can be exported.
"""
from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from runtime.errors import UserError
from runtime.checkpoints.packed_checkpoint import is_packed_model, load_packed

EXPORTERS = {"gptq": "runtime.checkpoints.export.gptq", "gguf": "runtime.checkpoints.export.gguf"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "generation_config.json")


def default_destination(model_dir: Path, kind: str) -> Path:
    """Where an export goes unless told: models/NAME-gptq/ beside the model, or models/NAME.gguf."""
    model_dir = Path(model_dir)
    return model_dir.with_name(f"{model_dir.name}-gptq") if kind == "gptq" else model_dir.with_name(
        f"{model_dir.name}.gguf")


def check_destination(out: Path) -> None:
    """UserError unless `out` is free: absent, or an empty directory."""
    out = Path(out)
    if out.is_symlink() or out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise UserError(f"{out} already exists: remove it or give another --export-out")


def copy_tokenizer(model_dir: Path, out_dir: Path) -> None:
    """Copy the tokenizer files a model directory has into `out_dir`."""
    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copyfile(Path(model_dir) / name, Path(out_dir) / name)


def export_model(model_dir, kind: str, out=None) -> Path:
    """Export the quantized model at `model_dir` as `kind` ("gptq" or "gguf") to `out`; return where it went."""
    if kind not in EXPORTERS:
        raise UserError(f"unknown export format {kind!r}: use one of {', '.join(EXPORTERS)}")
    model_dir = Path(model_dir)
    if not is_packed_model(model_dir):
        raise UserError(f"{model_dir} is not a model quantize.py wrote: quantize it first (rtn or gptq tags)")
    out = Path(out) if out is not None else default_destination(model_dir, kind)
    check_destination(out)
    config, tensors = load_packed(model_dir)
    importlib.import_module(EXPORTERS[kind]).export(model_dir, config, tensors, out)
    return out
