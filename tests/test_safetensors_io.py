"""Tests for runtime.checkpoints.safetensors_io against the reference `safetensors` package."""
import json
import os

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

from runtime.checkpoints.content_hash import HASH_KEY, crc32
from runtime.errors import UserError
from runtime.checkpoints.safetensors_io import read_safetensors, write_safetensors


def sample_tensors() -> dict[str, np.ndarray]:
    """One tensor of each NumPy dtype safetensors stores, with awkward shapes and layouts."""
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f32_transposed": rng.standard_normal((4, 6)).astype(np.float32).T,  # non-contiguous
        "f16": rng.standard_normal(7).astype(np.float16),
        "f64": rng.standard_normal((2, 2)).astype(np.float64),
        "i8": rng.integers(-128, 128, 9).astype(np.int8),
        "u8": rng.integers(0, 256, (3, 3)).astype(np.uint8),
        "i16": rng.integers(-2**15, 2**15, 5).astype(np.int16),
        "u16": rng.integers(0, 2**16, 5).astype(np.uint16),
        "i32": rng.integers(-2**31, 2**31, 4).astype(np.int32),
        "i64": rng.integers(-2**62, 2**62, 3).astype(np.int64),
        "bool": rng.integers(0, 2, 11).astype(bool),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def test_reference_reads_what_we_write(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    write_safetensors(path, tensors, {"format": "np", "note": "x"})
    loaded = safetensors.numpy.load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, expected in tensors.items():
        assert loaded[name].dtype == expected.dtype and np.array_equal(loaded[name], expected), name
    with safetensors.safe_open(path, framework="np") as f:
        metadata = f.metadata()
    assert json.loads(metadata.pop(HASH_KEY)) == {name: crc32(t) for name, t in tensors.items()}
    assert metadata == {"format": "np", "note": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left


def test_we_read_what_reference_writes_without_copying(tmp_path):
    tensors = {name: np.ascontiguousarray(t) for name, t in sample_tensors().items()}
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(tensors, path, metadata={"k": "v"})
    loaded, metadata = read_safetensors(path)
    assert metadata == {"k": "v"}
    assert loaded.keys() == tensors.keys()
    for name, expected in tensors.items():
        assert loaded[name].dtype == expected.dtype and np.array_equal(loaded[name], expected), name
    assert isinstance(loaded["f32"], np.memmap) and not loaded["f32"].flags.writeable


def test_bf16_is_widened_exactly(tmp_path):
    torch.manual_seed(0)
    value = torch.randn(5, 3).to(torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    safetensors.torch.save_file({"w": value}, path)
    loaded, _ = read_safetensors(path)
    assert loaded["w"].dtype == np.float32
    assert np.array_equal(loaded["w"], value.float().numpy())


def write_raw(path, header: dict, data: bytes) -> None:
    """A safetensors file with a hand-made header, to break it on purpose."""
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("damage", ["truncated", "bad_json", "huge_header", "offsets_vs_shape", "short_file"])
def test_damaged_files_raise_user_error(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({"w": np.ones((4, 4), np.float32)}, path)
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[:-10])
    elif damage == "bad_json":
        path.write_bytes(raw[:8] + b"{not json" + raw[17:])
    elif damage == "huge_header":
        path.write_bytes((10**12).to_bytes(8, "little") + raw[8:])
    elif damage == "offsets_vs_shape":
        write_raw(path, {"w": {"dtype": "F32", "shape": [4, 5], "data_offsets": [0, 64]}}, bytes(64))
    else:
        path.write_bytes(raw[:5])
    with pytest.raises(UserError, match="model.safetensors is truncated or corrupt .*delete it"):
        read_safetensors(path)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"old": np.zeros(3, np.float32)})
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(path, {"new": np.ones(1000, np.float32)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_unwritable_dtype_and_metadata_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="complex64"):
        write_safetensors(tmp_path / "a.safetensors", {"c": np.zeros(2, np.complex64)})
    with pytest.raises(UserError, match="metadata"):
        write_safetensors(tmp_path / "a.safetensors", {"c": np.zeros(2)}, {"bits": 4})


def resident_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc")
def test_released_pages_leave_memory_and_come_back_intact(tmp_path):
    from runtime.checkpoints.safetensors_io import release_pages
    big = np.arange(4 << 20, dtype=np.float32)  # 16 MiB
    path = tmp_path / "big.safetensors"
    write_safetensors(path, {"big": big})
    tensors, _ = read_safetensors(path)
    assert np.array_equal(tensors["big"], big)  # every page read: resident
    before = resident_kb(path)
    release_pages(tensors["big"])
    assert before > 15000 and resident_kb(path) < before - 15000
    assert np.array_equal(tensors["big"], big)  # read from the file again
    copy = big.copy()
    release_pages(copy)  # not mapped from a file: left alone
    assert np.array_equal(copy, big)
    release_pages([1.0, 2.0])  # not an array (a packed tensor in a layer's dict, say): left alone, no error


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc")
def test_a_loaded_embedding_keeps_no_pages_after_its_checksum(tmp_path):
    # the load checks the embedding's recorded CRC-32 (reading every page); a decode step reads a few rows, so
    # the pages go back to the OS and the rows are read from the file again, intact
    from runtime.checkpoints.packed_checkpoint import WEIGHTS, load_packed, save_packed
    embed = np.random.default_rng(0).standard_normal((4096, 1024)).astype(np.float16)  # 8 MiB
    save_packed(tmp_path, {}, {"model.embed_tokens.weight": embed, "lm_head.weight": np.ones((4, 4), np.float32)})
    _, tensors = load_packed(tmp_path)
    assert resident_kb(tmp_path / WEIGHTS) < 1024
    assert np.array_equal(tensors["model.embed_tokens.weight"][[7, 4000]], embed[[7, 4000]])
