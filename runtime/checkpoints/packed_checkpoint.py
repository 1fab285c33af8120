"""Saving and loading quantized models: packed tensors in one safetensors file.

A quantized model directory holds `config.json` (the model's HF config plus a
`quantization` section: method, bits, group, options), `model.safetensors`
and the tokenizer files. A packed weight named N is stored as the arrays
`N.<part>` (e.g. `N.qweight`, `N.scales`), and the file's metadata maps N to
a JSON object with its format name and parameters, so the format of every
tensor is read from the file, never guessed from the model's name. Arrays
that are not packed are stored as they are (norms in float32, embeddings in
float16). The file records the CRC-32 of every array (runtime.checkpoints.content_hash);
a packed tensor's arrays are checked the first time it is multiplied by, the
other arrays at load. A model's tensors (not a calibration state's) are
checked against its config.json (runtime.checkpoints.config_schema) before they are returned.
"""
from __future__ import annotations

import json
from pathlib import Path

from runtime.checkpoints.atomic import write_text
from runtime.checkpoints.checkpoint import read_directly, read_json
from runtime.checkpoints.config_schema import check_tensors
from runtime.checkpoints.content_hash import ContentCheck, defer, run_pending, take
from runtime.errors import UserError
from runtime.formats import format_class
from runtime.formats.base import PackedTensor
from runtime.checkpoints.safetensors_io import read_safetensors, release_pages, write_safetensors

WEIGHTS = "model.safetensors"


def is_packed_model(path: Path) -> bool:
    """True when `path` is a directory whose config.json (a regular file) has a quantization section."""
    config = Path(path) / "config.json"
    try:
        return config.is_file() and "quantization" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
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
    """(config, {name: array or PackedTensor}) of a quantized model directory, every tensor checked against
    the model its config describes."""
    directory = Path(directory)
    config = read_json(directory / "config.json", "re-quantize the model")
    tensors = read_packed(directory)
    if "quantization" in config:
        check_tensors(config, tensors, str(directory / WEIGHTS), str(directory / "config.json"))
    for name, value in tensors.items():
        if read_directly(name, tensors):
            run_pending(value)
            if value.ndim == 2:  # an embedding: the check read every page, a step reads a few rows
                release_pages(value)
    return config, tensors


def read_packed(directory: Path) -> dict:
    """{name: array or PackedTensor} of the weights file in `directory`, each rebuilt in its recorded format
    (not checked against a model: the format tests use this for tensors of no model)."""
    directory = Path(directory)
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
        checks = [take(a) for a in parts.values()]  # checked together when the packed tensor is first used
        tensors[name] = fmt.from_tensors(parts, meta)
        defer(tensors[name], ContentCheck(directory / WEIGHTS, [i for c in checks if c for i in c.items]))
    tensors.update(arrays)
    return tensors
