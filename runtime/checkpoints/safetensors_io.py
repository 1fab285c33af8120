"""Read and write .safetensors files with NumPy only, without copying on read.

Follows the safetensors format spec (https://github.com/huggingface/safetensors,
README "Format"):

    [8 bytes]  N, unsigned little-endian 64-bit: the header's length in bytes
    [N bytes]  JSON object, UTF-8, may be padded with trailing spaces:
                 {"__metadata__": {str: str},                      (optional)
                  "<name>": {"dtype": "F32", "shape": [d0, d1, ...],
                             "data_offsets": [begin, end]}, ...}
    [rest]     byte buffer; a tensor's bytes are buffer[begin:end], row-major,
               little-endian

The reader memory-maps the file once and returns read-only `np.memmap` views
into it, so loading costs no RAM until a tensor is touched. BF16 has no NumPy
dtype: BF16 tensors are widened to float32 on read (that one dtype is copied).
The writer streams each array to a temporary file in the target directory and
renames it into place, so a crash never leaves a half-written file behind, and
records the CRC-32 of every tensor in the metadata (runtime.checkpoints.content_hash); the
reader attaches each recorded checksum to its tensor, to be checked on first use.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import stat
from pathlib import Path

import numpy as np

from runtime.checkpoints.atomic import atomic_file
from runtime.checkpoints.content_hash import HASH_KEY, ContentCheck, defer, hash_record, read_record, run_pending
from runtime.errors import UserError

# safetensors dtype code -> NumPy dtype (little-endian); BF16 is read as its raw bits.
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# NumPy dtype -> safetensors dtype code, for the writer (BF16 cannot be written from NumPy).
CODES = {dtype: code for code, dtype in DTYPES.items() if code != "BF16"}
# Largest header accepted; the reference implementation uses the same 100 MB limit.
MAX_HEADER_BYTES = 100_000_000
HEADER_ALIGNMENT = 8


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bit patterns (uint16) to float32: bf16 is the top half of an f32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def corrupt(path: Path, reason: str) -> UserError:
    """The error for a damaged weight file: names it, says why, says what to do."""
    return UserError(f"{path} is truncated or corrupt ({reason}); delete it and rebuild/re-download")


def require_regular_file(path: Path, fix: str = "check the model path or rebuild/re-download it") -> None:
    """UserError unless `path` is a regular file: a FIFO or device would block or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise UserError(f"{path} does not exist; {fix}") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{path} is not a regular file (a directory, FIFO, socket or device); "
                        "give the path of the model file itself")


def read_header(path: Path) -> tuple[dict, int, int]:
    """Parse and sanity-check the header; return (header dict, data start, data size in bytes)."""
    size = path.stat().st_size
    if size < 8:
        raise corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise corrupt(path, f"header length {n} does not fit in a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(path, f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise corrupt(path, "header is not a JSON object")
    return header, 8 + n, size - 8 - n


def check_entry(path: Path, name: str, entry: object, data_size: int) -> tuple[np.dtype, tuple, int, int]:
    """Validate one tensor's header entry; return (dtype, shape, begin, end)."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise corrupt(path, f"tensor {name!r} has no dtype/shape/data_offsets")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in DTYPES:
        raise corrupt(path, f"tensor {name!r} has unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise corrupt(path, f"tensor {name!r} has a bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise corrupt(path, f"tensor {name!r} has bad data_offsets {offsets!r}")
    begin, end = offsets
    dtype = DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != expected:
        raise corrupt(path, f"tensor {name!r} spans {end - begin} bytes, its shape {shape} {code} needs {expected}")
    if end > data_size:
        raise corrupt(path, f"tensor {name!r} ends at byte {end} of a {data_size}-byte data section")
    return dtype, tuple(shape), begin, end


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Map a .safetensors file; return ({name: read-only array}, the header's __metadata__).

    Arrays are `np.memmap` views in the stored dtype, except BF16, which comes
    back as a float32 copy. Raises UserError when the file is missing,
    truncated or its header is inconsistent.
    """
    path = Path(path)
    require_regular_file(path)
    header, start, data_size = read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt(path, "__metadata__ is not a JSON object of strings")
    record = read_record(path, metadata)
    metadata.pop(HASH_KEY, None)
    entries = {name: check_entry(path, name, entry, data_size) for name, entry in header.items()}
    unknown = sorted(record.keys() - entries.keys())
    if unknown:
        raise corrupt(path, f"its checksums name tensor {unknown[0]!r}, which it does not hold")
    if not entries:
        return {}, metadata
    buffer = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(data_size,))  # [data_size]
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        array = buffer[begin:end].view(dtype).reshape(shape)
        if name in record:
            defer(array, ContentCheck(path, [(name, record[name], array)]))
        if header[name]["dtype"] == "BF16":  # widened into a copy now, so checked now
            run_pending(array)
            array = bf16_to_float32(array)
        tensors[name] = array
    return tensors, metadata


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (and string `metadata`) to a standard .safetensors file, atomically.

    The metadata also records the CRC-32 of every tensor (runtime.checkpoints.content_hash).

    Tensors are laid out widest dtype first so every tensor starts aligned to
    its item size; each array is streamed to disk on its own (a non-contiguous
    one is copied, one at a time).
    """
    path = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise UserError("safetensors metadata must map strings to strings; json.dumps the values first")
    arrays = {}
    for name, array in tensors.items():
        array = np.asarray(array)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in CODES:
            raise UserError(f"cannot write tensor {name!r} of dtype {array.dtype} to safetensors; "
                            f"convert it to one of {sorted(str(d) for d in CODES)}")
        arrays[name] = array.astype(dtype, copy=False)
    order = sorted(arrays, key=lambda name: (-arrays[name].dtype.itemsize, name))
    header = {"__metadata__": {**(metadata or {}), HASH_KEY: hash_record(arrays)}}
    offset = 0
    for name in order:
        array = arrays[name]
        header[name] = {"dtype": CODES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % HEADER_ALIGNMENT)
    with atomic_file(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            f.write(np.ascontiguousarray(arrays[name]).reshape(-1).view(np.uint8))  # [nbytes]


def release_pages(array: np.ndarray) -> None:
    """Let the OS take back the resident pages of an array mapped read-only from a file by `read_safetensors`
    (madvise MADV_DONTNEED on the whole pages inside it): they leave this process's memory and are read
    from the file again if the array is used again. Anything else (an array not mapped that way, a packed
    tensor) and systems without madvise are left alone."""
    if not isinstance(array, np.ndarray):
        return
    base = array
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if base is None or base.flags.writeable or advice is None or not hasattr(ctypes.CDLL(None), "madvise"):
        return
    page = mmap.PAGESIZE
    first = -(-array.ctypes.data // page) * page  # whole pages only: the neighbours' tensors keep theirs
    last = (array.ctypes.data + array.nbytes) // page * page
    if last > first:
        madvise = ctypes.CDLL(None).madvise
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        madvise(first, last - first, advice)

