"""Perplexity with the protocol of the GPTQ paper (Frantar et al. 2022, §4 and its code).

The whole test text is tokenized once; it is cut into non-overlapping windows
of `seqlen` tokens, the tail that does not fill a window is dropped, and each
window is run on its own (no state carried over). Every token of a window but
the first is predicted; ppl = exp(mean negative log-likelihood over all
predicted tokens).

Each finished window's NLL is saved atomically to a state file, so an
interrupted evaluation resumes where it stopped and gives the same number. A
full disk while saving it is one line naming the file (its temporary removed).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.api import token_logprobs
from runtime.checkpoints.atomic import full_disk_reported, write_text
from runtime.errors import UserError
from runtime.formats.base import activation_mode
from runtime.hub.resolve import PROJECT_ROOT

STATE_DIR = PROJECT_ROOT / ".cache" / "perplexity"


def windows_of(token_ids, seqlen: int, limit: int | None = None) -> list:
    """Non-overlapping windows of `seqlen` tokens, the tail dropped; the first `limit` only."""
    count = len(token_ids) // seqlen
    if count == 0:
        raise UserError(f"the text has {len(token_ids)} tokens, fewer than one window of {seqlen}: "
                        f"lower --seqlen")
    if limit is not None:
        if limit < 1:
            raise UserError("--windows must be >= 1")
        count = min(count, limit)
    return [token_ids[i * seqlen:(i + 1) * seqlen] for i in range(count)]


def state_path(model_path: Path, token_ids, seqlen: int, engine: str = "") -> Path:
    """Where the resumable state of one (model, text, seqlen, engine) evaluation lives.

    The key includes the model directory's modification time, so a rebuilt model starts afresh;
    `engine` tells apart another runtime scoring the same file (the benchmark's llama.cpp rows);
    the activation mode (QLLM_ACTIVATIONS, QLLM_INT8_KERNEL) and the source of the forward pass
    (`forward_source_digest`) tell apart a run with other kernels, so a stale number never resumes.
    """
    digest = hashlib.sha256(np.asarray(token_ids, dtype=np.int64).tobytes())
    digest.update(f"{Path(model_path).resolve()}@{Path(model_path).stat().st_mtime_ns}|{seqlen}".encode())
    digest.update(f"{engine}|{activation_mode()}|{forward_source_digest()}".encode())
    return STATE_DIR / f"{digest.hexdigest()[:24]}.json"


def forward_source_digest() -> str:
    """A digest of the files whose code computes logits: model.py and runtime/'s Python and CUDA sources."""
    digest = hashlib.sha256()
    sources = [PROJECT_ROOT / "model.py", *sorted((PROJECT_ROOT / "runtime").rglob("*.py")),
               *sorted((PROJECT_ROOT / "runtime").rglob("*.cu*"))]
    for path in sources:
        digest.update(path.relative_to(PROJECT_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def load_state(path: Path | None) -> list:
    """NLL sums of the windows finished by an earlier run (empty when none)."""
    if path is None or not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["window_nll"])
    except (ValueError, KeyError):
        return []  # a damaged state file only costs the windows it held


def save_state(path: Path | None, window_nll: list):
    """Write the finished windows' NLL sums atomically."""
    if path is None:
        return
    with full_disk_reported(path, "free some space on that disk, or evaluate with --no-resume (no state saved)"):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"window_nll": window_nll}))


def perplexity(model, token_ids, seqlen: int, limit: int | None = None, state_path: Path | None = None,
               progress: bool = True) -> dict:
    """{"ppl", "tokens" (predicted), "windows", "seqlen"} of the model on `token_ids`."""
    if seqlen < 2:
        raise UserError("--seqlen must be >= 2")
    windows = windows_of(token_ids, seqlen, limit)
    window_nll = load_state(state_path)[:len(windows)]
    for window in tqdm(windows[len(window_nll):], desc="perplexity", unit="window", disable=not progress,
                       initial=len(window_nll), total=len(windows)):
        window_nll.append(float(-token_logprobs(model, window).sum()))
        save_state(state_path, window_nll)
    predicted = len(windows) * (seqlen - 1)
    return {"ppl": float(np.exp(sum(window_nll) / predicted)), "tokens": predicted,
            "windows": len(windows), "seqlen": seqlen}
