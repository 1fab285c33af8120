"""Content checksums of stored tensors: recorded when this project writes a model, checked on load.

Neither safetensors nor GGUF carries a checksum, so a flipped byte in weight
data would load and generate without a word. Every safetensors file this
project writes records, in its `__metadata__` under `HASH_KEY`, the CRC-32 of
each tensor's stored bytes (a JSON object {tensor name: 8 hex digits}).
CRC-32 (zlib's, as zip, gzip and PNG use it) finds every error burst of up to
32 bits and runs at several GB/s; the checksum sits in the same file, so it
guards against accidental corruption, which is what it is for, not against
someone who edits the file on purpose.

Loading a model only maps its file, so hashing every byte at load would
multiply the load time. Instead each mapped tensor carries a `ContentCheck`
that runs the first time the tensor is used: `runtime.linear` runs it for the
weights it multiplies by, the loaders run it at once for the tensors the
forward pass reads directly (embeddings, norms, biases). `verify_model` in
runtime/checkpoints/verify.py runs every check (and reads models written elsewhere in full).
"""
from __future__ import annotations

import json
import zlib

import numpy as np

from runtime.errors import UserError

HASH_KEY = "content_crc32"
CHECK_ATTRIBUTE = "content_check"  # the attribute of a mapped array or packed tensor holding its pending check


def crc32(array: np.ndarray) -> str:
    """The CRC-32 of an array's bytes in C order, as 8 hex digits."""
    return f"{zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8)):08x}"


def hash_record(arrays: dict[str, np.ndarray]) -> str:
    """The metadata value recording the CRC-32 of every array."""
    return json.dumps({name: crc32(a) for name, a in arrays.items()}, separators=(",", ":"))


def read_record(path, metadata: dict) -> dict[str, str]:
    """{tensor name: recorded CRC-32} from a file's metadata ({} when it records none)."""
    text = metadata.get(HASH_KEY)
    if text is None:
        return {}
    try:
        record = json.loads(text)
    except (TypeError, ValueError):
        record = None
    if not isinstance(record, dict) or not all(isinstance(v, str) for v in record.values()):
        raise UserError(f"{path}: its recorded tensor checksums ({HASH_KEY}) are damaged; "
                        "delete the file and rebuild/re-download it")
    return record


class ContentCheck:
    """The recorded CRC-32 of one or more stored arrays, compared with their bytes when run."""

    def __init__(self, path, items: list):
        self.path = path
        self.items = items  # [(tensor name, recorded crc, array)]

    def __call__(self) -> None:
        """UserError naming the file and tensor whose bytes no longer match their record."""
        for name, recorded, array in self.items:
            if crc32(array) != recorded:
                raise UserError(f"{self.path}: tensor {name!r} does not match its recorded checksum, so the "
                                "file is corrupt; delete it and rebuild/re-download the model")


def defer(value, check: ContentCheck) -> None:
    """Attach `check` to `value` to run on first use; run it now when `value` takes no attributes."""
    try:
        setattr(value, CHECK_ATTRIBUTE, check)
    except AttributeError:
        check()


def take(value) -> ContentCheck | None:
    """Detach and return the pending check of `value` (None when it has none)."""
    check = getattr(value, CHECK_ATTRIBUTE, None)
    if check is not None:
        delattr(value, CHECK_ATTRIBUTE)
    return check


def run_pending(value) -> None:
    """Run and drop the pending check of `value`, if any (a tensor about to be used)."""
    check = take(value)
    if check is not None:
        check()
