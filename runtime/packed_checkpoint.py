"""Saving and loading quantized models: packed tensors in one safetensors file.

A quantized model directory holds `config.json` (the model's HF config plus a
`quantization` section: method, bits, group, options), `model.safetensors`
and the tokenizer files. A packed weight named N is stored as the arrays
`N.<part>` (e.g. `N.qweight`, `N.scales`), and the file's metadata maps N to
a JSON object with its format name and parameters, so the format of every
tensor is read from the file, never guessed from the model's name. Arrays
that are not packed are stored as they are (norms in float32, embeddings in
float16).
"""
from __future__ import annotations

import json
from pathlib import Path

from runtime.atomic import write_text
from runtime.errors import UserError
from runtime.formats import format_class
from runtime.formats.base import PackedTensor
from runtime.safetensors_io import read_safetensors, write_safetensors

WEIGHTS = "model.safetensors"


def is_packed_model(path: Path) -> bool:
    """True when `path` is a directory whose config.json has a quantization section."""
    try:
        return "quantization" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def save_packed(directory: Path, config: dict, tensors: dict) -> None:
    """Write config.json and model.safetensors (arrays and packed tensors) into `directory`."""
    arrays, metadata = {}, {}
    for name, value in tensors.items():
        if isinstance(value, PackedTensor):
            metadata[name] = json.dumps({"format": value.FORMAT, **value.meta()})
            arrays.update({f"{name}.{part}": a for part, a in value.tensors().items()})
        else:
            arrays[name] = value
    write_safetensors(Path(directory) / WEIGHTS, arrays, metadata)
    write_text(Path(directory) / "config.json", json.dumps(config, indent=2))


def load_packed(directory: Path) -> tuple[dict, dict]:
    """(config, {name: array or PackedTensor}) of a quantized model directory."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    arrays, metadata = read_safetensors(directory / WEIGHTS)
    tensors = {}
    for name, text in metadata.items():
        try:
            meta = json.loads(text)
            fmt = format_class(meta.pop("format"))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{directory / WEIGHTS}: the metadata of {name!r} is not a packed-tensor "
                            f"description; re-quantize the model") from None
        parts = {key[len(name) + 1:]: arrays.pop(key) for key in list(arrays) if key.startswith(name + ".")}
        tensors[name] = fmt.from_tensors(parts, meta)
    tensors.update(arrays)
    return config, tensors
