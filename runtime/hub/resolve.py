"""Turning what the user typed after --model into a checkpoint path.

A NAME resolves, in order, to: an existing path (an HF model directory, a
`.gguf` file, a llama2.c `.bin` file), then `models/NAME` (a directory or one
of those files), then a model on the Hugging Face Hub: `org/name`, optionally
`org/name@REVISION` (a branch, tag or commit), or one of the short names of
`HUB_NAMES` (`opt-1.3b` is `facebook/opt-1.3b`). Hub models are downloaded
once into the Hugging Face cache by runtime/hub/download.py. With no name, the default
model `models/smollm2-135m/` (built by `make install`; the name never goes to
the Hub). Anything else gets a one-line error that says what to do: that the
tag is empty (a name ending in "."), that the default model is not built yet,
or else which models exist.

A quantized model built from a base is saved as `models/DIR.TAG/`, where DIR
is `base_dir_name(BASE)`: the last part of a local base's path, the short
name of a Hub base (`opt-1.3b`, also for `facebook/opt-1.3b`, the same
repository), and `org--name` for any other Hub repository (`@REVISION`
appended when one is given, with "/" written "--").
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# where models live: models/ in the project, or wherever the environment variable QLLM_MODELS_DIR says
MODELS_DIR = Path(os.environ.get("QLLM_MODELS_DIR") or PROJECT_ROOT / "models").expanduser().resolve()
DEFAULT_MODEL = "smollm2-135m"
# short names of the Hub models of the families this project runs (OPT, and Llama-architecture models)
HUB_NAMES = {
    **{f"opt-{size}": f"facebook/opt-{size}" for size in ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b",
                                                          "66b")},
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
}
# a Hub repository id: owner/name of letters, digits, "-", "_" and "."; then an optional @revision
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<revision>[\w./-]{1,200}))?")


@dataclass(frozen=True)
class HubModel:
    """A model on the Hub: its repository, the revision asked for (None: the default branch), and the
    directory name its quantized models get under models/."""
    repo_id: str
    revision: str | None
    dir_name: str


def hub_model(name: str) -> HubModel | None:
    """The Hub model that `name` stands for (a short name of HUB_NAMES or owner/name[@revision]), or None."""
    base, at, revision = name.partition("@")
    match = HUB_ID.fullmatch(HUB_NAMES.get(base, base) + at + revision)
    if match is None or ".." in match["repo"] or match["repo"].endswith("."):
        return None
    repo, revision = match["repo"], match["revision"]
    short = {v: k for k, v in HUB_NAMES.items()}.get(repo)
    dir_name = short or repo.replace("/", "--")
    if revision:
        dir_name += "@" + revision.replace("/", "--")
    return HubModel(repo, revision, dir_name)


def base_dir_name(name: str, models_dir: Path = MODELS_DIR) -> str:
    """The name that models built from the base `name` get under models/ (before ".TAG")."""
    ref = None if find_model(name, models_dir) else hub_model(name)
    return ref.dir_name if ref else Path(name).name


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
                         f"model or BASE.TAG, e.g. BASE.rtn4g128 (`python quantize.py --help` lists the tags)")
    if leaf.split(".")[0] == DEFAULT_MODEL and not (models_dir / DEFAULT_MODEL / "config.json").is_file():
        return UserError(f"the default model is not built yet ({models_dir / DEFAULT_MODEL} is missing): "
                         f"run `make install` (or use its original weights from the Hub: "
                         f"HuggingFaceTB/SmolLM2-135M-Instruct)")
    names = ", ".join(available_models(models_dir)) or "none yet (run `make install`)"
    return UserError(f"model {name!r} not found: give a directory with config.json, a .gguf or llama2.c .bin "
                     f"file, a name under {models_dir}/ (available: {names}), or a Hugging Face Hub model "
                     f"(org/name[@revision], or one of {', '.join(HUB_NAMES)})")


def find_model(name: str | None, models_dir: Path = MODELS_DIR) -> Path | None:
    """The local checkpoint path (directory or file) that `name` stands for, or None."""
    name = name or DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.exists():
        return path
    candidate = models_dir / name
    if (candidate / "config.json").is_file() or candidate.is_file():
        return candidate
    return None


def resolve_model(name: str | None, models_dir: Path = MODELS_DIR) -> Path:
    """The checkpoint path that `name` stands for, downloading a Hub model into the Hugging Face cache
    first; UserError saying what to do when there is none."""
    path = find_model(name, models_dir)
    if path is not None:
        return path
    ref = hub_model(name) if name else None
    if ref is None:
        raise not_found(name or DEFAULT_MODEL, models_dir)
    from runtime.hub.download import download_model
    return download_model(ref.repo_id, ref.revision)
