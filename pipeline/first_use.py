"""Build on first use: the checkpoint a model name stands for, built from its base when it is a BASE.TAG
not built yet.

Finding a model that exists imports nothing of the build (the calibration
driver, the build driver, the method files): a saved model loads without
them, and `build_quantized` is imported only when a build is needed.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.tags import parse_tag
from runtime.errors import UserError
from runtime.method_contract import QuantSpec
from runtime.hub.resolve import MODELS_DIR, base_dir_name, find_model, hub_model, resolve_model


def split_quantized_name(name: str) -> tuple[str, str] | None:
    """("smollm2-135m", "rtn4g128") for "smollm2-135m.rtn4g128"; None when there is no tag."""
    base, dot, tag = name.rpartition(".")
    return (base, tag) if dot and base and tag and "/" not in tag else None


def parsed_tag(tag: str) -> QuantSpec | None:
    """The spec that `tag` names, or None when it is not a tag."""
    try:
        return parse_tag(tag)
    except UserError:
        return None


def find_or_build(name: str | None, progress: bool = True) -> Path:
    """The checkpoint `name` stands for; a BASE.TAG that does not exist yet is built from BASE, a local
    model or one downloaded from the Hub (runtime/hub/resolve.py). A Hub name whose last dot is not a tag
    ("facebook/opt-1.3b": "3b") is the float model itself."""
    path = find_model(name)
    if path is not None:
        return path
    parts = split_quantized_name(name or "")
    if (parts is None or (parsed_tag(parts[1]) is None and hub_model(name))
            or (find_model(parts[0]) is None and hub_model(parts[0]) is None)):
        return resolve_model(name)  # a Hub model, or the error that says what to do
    base, tag = parts
    spec = parse_tag(tag)
    out_dir = MODELS_DIR / f"{base_dir_name(base)}.{spec.tag}"
    if (out_dir / "config.json").is_file():
        return out_dir
    base_path = resolve_model(base)
    if progress:
        print(f"{name} is not built yet: building it from {base_path} with {spec.tag} ...", file=sys.stderr,
              flush=True)
    from pipeline.quantize_model import build_quantized  # the build path, imported only for a build
    return build_quantized(base_path, spec, out_dir, progress)
