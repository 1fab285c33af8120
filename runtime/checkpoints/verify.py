"""Checking a whole model file before trusting it: `python run.py --verify`, `load(..., verify=True)`.

Loading checks the config, every tensor's name, shape and dtype, and (lazily,
on first use) the checksums this project records when it writes a model
(runtime.checkpoints.content_hash). `verify_model` goes further: it runs every recorded
checksum at once and reads every tensor in full, so models written elsewhere
(GGUF, llama2.c, Hugging Face files without checksums) are at least checked
to be complete and finite.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.checkpoints.checkpoint import load_checkpoint
from runtime.checkpoints.content_hash import take
from runtime.errors import UserError
from runtime.checkpoints.packed_checkpoint import is_packed_model, load_packed


def verify_model(path: str | Path) -> str:
    """Check every tensor of the model at `path` in full; UserError naming the first bad one.

    Returns a one-line summary of what was checked.
    """
    path = Path(path)
    _, tensors = load_packed(path) if is_packed_model(path) else load_checkpoint(path)
    recorded = 0
    for name, value in tensors.items():
        check = take(value)
        if check is not None and check.items:
            check()
            recorded += 1
        arrays = [value] if hasattr(value, "ndim") else value.tensors().values()
        for array in arrays:
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                raise UserError(f"{path}: tensor {name!r} holds NaN or infinite values; the model is damaged: "
                                "rebuild or re-download it")
    checksums = f", {recorded} checked against their recorded checksums" if recorded else \
        " (the file records no checksums)"
    return f"{path}: all {len(tensors)} tensors are complete and finite{checksums}"
