"""Training checkpoints: the adapter, the AdamW state, the data position and the settings, saved atomically.

A checkpoint is the directory OUT/checkpoint/, replaced as a whole by renames
(runtime/checkpoints/atomic.py), so a run killed at any moment leaves either the previous
checkpoint or the new one:

    state.json         {"step": optimizer steps done, "micro_batch": data position,
                        "settings": the run's settings (--resume must repeat them)}
    tensors.safetensors  A.<name>, B.<name> (LoRA factors, Hu et al. 2021) and the
                         AdamW moments m.*, v.* and step (Loshchilov & Hutter 2019)

Every random draw of training (adapter initialization, data order, dropout
masks) comes from a generator seeded by (seed, counters), so the seed in the
settings plus the step is the whole random state: a resumed run draws what
the uninterrupted run would have drawn, and its adapter comes out
bit-identical (QLoRA, Dettmers et al. 2023, trains the same adapters).
"""
from __future__ import annotations

import json
from pathlib import Path

from runtime.checkpoints.atomic import atomic_directory
from runtime.checkpoints.checkpoint import read_json
from runtime.errors import UserError
from runtime.checkpoints.safetensors_io import read_safetensors, write_safetensors

DIRECTORY = "checkpoint"
STATE_FILE = "state.json"
TENSOR_FILE = "tensors.safetensors"


def save_checkpoint(out: Path, step: int, micro_batch: int, settings: dict, arrays: dict) -> None:
    """Replace OUT/checkpoint atomically with the state after `step` optimizer steps."""
    with atomic_directory(out / DIRECTORY) as tmp:
        write_safetensors(tmp / TENSOR_FILE, arrays)
        state = {"step": step, "micro_batch": micro_batch, "settings": settings}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def load_checkpoint(out: Path, settings: dict) -> tuple[dict, dict]:
    """(state, arrays) of OUT/checkpoint; UserError when there is none or it was made with other settings."""
    directory = out / DIRECTORY
    if not (directory / STATE_FILE).is_file():
        raise UserError(f"--resume: {directory} holds no checkpoint; run without --resume to start afresh")
    state = read_json(directory / STATE_FILE, "delete the checkpoint and run without --resume")
    saved = state.get("settings", {})
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if changed:
        raise UserError(f"--resume: the checkpoint in {directory} was made with other settings ("
                        + ", ".join(f"{k}: {saved.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
                        + "); repeat the first run's options")
    arrays, _ = read_safetensors(directory / TENSOR_FILE)
    return state, arrays
