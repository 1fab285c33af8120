"""Turning what the user typed after --model into a checkpoint path.

A NAME resolves, in order, to: an existing path (an HF model directory, a
`.gguf` file, a llama2.c `.bin` file), then `models/NAME` (a directory or one
of those files). With no name, the
default model `models/smollm2-135m/` (built by `make install`). Anything else
gets a one-line error that says what to do: that the tag is empty (a name
ending in "."), that the default model is not built yet, or else which models
exist.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from runtime.errors import UserError
from runtime.tags import TAG_FORMS

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# where models live: models/ in the project, or wherever the environment variable QLLM_MODELS_DIR says
MODELS_DIR = Path(os.environ.get("QLLM_MODELS_DIR") or PROJECT_ROOT / "models").expanduser().resolve()
DEFAULT_MODEL = "smollm2-135m"


def available_models(models_dir: Path = MODELS_DIR) -> list[str]:
    """Names of the model directories under models/."""
    if not models_dir.is_dir():
        return []
    return sorted(p.name for p in models_dir.iterdir() if (p / "config.json").is_file())


def not_found(name: str, models_dir: Path) -> UserError:
    """The error for a name that resolves to nothing, with what to do about it."""
    leaf = name.split("/")[-1]
    if leaf.endswith("."):
        return UserError(f"model {name!r} has an empty quantization tag after the '.': write BASE for the float "
                         f"model or BASE.TAG, with TAG = {TAG_FORMS}")
    opt = re.match(r"opt-\d+(?:\.\d+)?[mb]", leaf)
    base = opt[0] if opt else leaf.split(".")[0]
    if opt:
        return UserError(f"model {name!r} not found: download the Hugging Face directory facebook/{base} "
                         f"(config.json, pytorch_model.bin or *.safetensors, vocab.json, merges.txt) "
                         f"into {models_dir / base}/")
    if base == DEFAULT_MODEL and not (models_dir / base / "config.json").is_file():
        return UserError(f"the default model is not built yet ({models_dir / base} is missing): "
                         f"run `make install`")
    names = ", ".join(available_models(models_dir)) or "none yet (run `make install`)"
    return UserError(f"model {name!r} not found: give a directory with config.json, a .gguf or "
                     f"llama2.c .bin file, or a name under {models_dir}/ (available: {names})")


def find_model(name: str | None, models_dir: Path = MODELS_DIR) -> Path | None:
    """The checkpoint path (directory or file) that `name` stands for, or None."""
    name = name or DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.exists():
        return path
    candidate = models_dir / name
    if (candidate / "config.json").is_file() or candidate.is_file():
        return candidate
    return None


def resolve_model(name: str | None, models_dir: Path = MODELS_DIR) -> Path:
    """The checkpoint path that `name` stands for; UserError saying what to do when there is none."""
    path = find_model(name, models_dir)
    if path is None:
        raise not_found(name or DEFAULT_MODEL, models_dir)
    return path
