"""Fuzzing the loaders through the API: damaged model files give a UserError or load, nothing else.

Small models are built once: a tiny Llama saved by transformers (float
safetensors, no checksums), the same saved by us (with checksums), a packed
model of ours built from it (rtn4), a GGUF with an
embedded byte-level tokenizer and a chat template, and each directory's
config.json. Every case copies one of them, damages it with a seeded
mutation (byte flips, weighted towards the headers, truncation, edits of the
safetensors header or of config.json as JSON) and runs `pipeline.api.load`
plus a short generation. Every outcome must be a `UserError` or a successful
run; any other exception fails the test with the seed that reproduces it. In
the models we write (with checksums) a flip in tensor data must never load.

The normal run tries FUZZ_CASES cases per target (default 60, 360 in all); `make fuzz` sets it to thousands.
"""
import json
import os
import random
import shutil
import time
from collections import Counter

import numpy as np
import pytest
from tokenizers import pre_tokenizers

from conftest import save_tiny_llama
from pipeline.api import load
from runtime.checkpoints.checkpoint import load_checkpoint, save_checkpoint
from runtime.errors import UserError
from pipeline.quantize_model import build_quantized
from pipeline.tags import parse_tag
from test_gguf_io import write_gguf

CASES = int(os.environ.get("FUZZ_CASES", "60"))
BAD_VALUES = ["64", -1, 0, None, [], ["x"], {}, 1e308, float("nan"), True, 2 ** 63, 3, 0.5, "llama", [1, "x"]]


def write_tokenized_gguf(path, model):
    """A GGUF of `model` (vocab 257) with a byte-level 'gpt2' tokenizer and a chat template."""
    def tokenizer(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(sorted(pre_tokenizers.ByteLevel.alphabet()) + ["<|endoftext|>"])
        writer.add_token_types([1] * 256 + [3])
        writer.add_token_merges([])
        writer.add_chat_template("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")

    write_gguf(path, model, bos=256, eos=256, metadata=tokenizer)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """{target name: (pristine path, the file in it that gets damaged)}."""
    root = tmp_path_factory.mktemp("fuzz")
    float_dir, packed_dir = root / "float", root / "float.rtn4"
    save_tiny_llama(float_dir, num_hidden_layers=2, max_position_embeddings=32)
    build_quantized(float_dir, parse_tag("rtn4"), packed_dir, progress=False)
    ours = root / "ours"  # the same model written by us, with checksums
    shutil.copytree(float_dir, ours)
    save_checkpoint(ours, *load_checkpoint(float_dir))
    small = save_tiny_llama(root / "small", vocab_size=257, num_hidden_layers=2, max_position_embeddings=32)
    write_tokenized_gguf(root / "tiny.gguf", small)
    return {"float": (float_dir, "model.safetensors"), "ours": (ours, "model.safetensors"), "packed": (packed_dir, "model.safetensors"),
            "gguf": (root / "tiny.gguf", None), "config": (float_dir, "config.json"),
            "packed-config": (packed_dir, "config.json")}


def flip(data: bytearray, rng: random.Random, header: int) -> str:
    """XOR one byte, half the time inside the first `header` bytes."""
    at = rng.randrange(min(header, len(data))) if rng.random() < 0.5 else rng.randrange(len(data))
    data[at] ^= rng.randrange(1, 256)
    return f"flip {'header' if at < header else 'data'} byte {at}"


def edit_safetensors_header(data: bytearray, rng: random.Random) -> tuple[bytearray, str]:
    """Rewrite the JSON header with one entry renamed, dropped or given another dtype, shape or offsets."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = rng.choice(sorted(header))
    entry = header[name]
    op = rng.choice(["rename", "drop", "dtype", "shape", "offsets", "meta"])
    if op == "rename":
        header[name + "x" if rng.random() < 0.5 else name.replace("layers.0", "layers.7")] = header.pop(name)
    elif op == "drop":
        del header[name]
    elif name == "__metadata__" or op == "meta":
        meta = header.setdefault("__metadata__", {})
        key = rng.choice(sorted(meta) or ["x"])
        value = meta.get(key, "{}")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        if isinstance(parsed, dict) and parsed:
            parsed[rng.choice(sorted(parsed))] = rng.choice(BAD_VALUES)
        meta[key] = json.dumps(parsed) if rng.random() < 0.8 else rng.choice(["", "{", "[]", "null"])
        op = f"meta {key}"
    elif op == "dtype":
        entry["dtype"] = rng.choice(["F32", "F16", "I32", "U8", "BF16", "F64", "I8", "BOOL"])
    elif op == "shape":
        entry["shape"] = list(reversed(entry["shape"])) if rng.random() < 0.5 else \
            [int(np.prod(entry["shape"]))] if rng.random() < 0.5 else entry["shape"] + [1]
    else:
        begin, end = entry["data_offsets"]
        shift = rng.choice([-8, -2, 2, 8, 4096])
        entry["data_offsets"] = [begin + shift, end + shift] if rng.random() < 0.5 else [begin, end + shift]
    raw = json.dumps(header).encode()
    return bytearray(len(raw).to_bytes(8, "little") + raw + data[8 + n:]), f"header {op} {name}"


def edit_config(data: bytearray, rng: random.Random) -> tuple[bytearray, str]:
    """config.json with one key dropped or set to a bad value."""
    config = json.loads(data)
    key = rng.choice(sorted(config))
    if rng.random() < 0.3:
        del config[key]
        return bytearray(json.dumps(config).encode()), f"drop {key}"
    config[key] = rng.choice(BAD_VALUES + [config[key] * 2 if isinstance(config[key], int) else 1])
    return bytearray(json.dumps(config).encode()), f"set {key}={config[key]!r}"


def mutate(target: str, data: bytearray, rng: random.Random) -> tuple[bytearray, str]:
    """One seeded damage to the bytes of a target's file."""
    kind = rng.random()
    if kind < 0.15:
        keep = rng.randrange(len(data))
        return data[:keep], f"truncate to {keep}"
    if target in ("config", "packed-config") and kind < 0.7:
        return edit_config(data, rng)
    if target in ("float", "ours", "packed") and kind < 0.5:
        return edit_safetensors_header(data, rng)
    header = int.from_bytes(data[:8], "little") + 8 if target in ("float", "ours", "packed") else 8192
    notes = [flip(data, rng, header) for _ in range(rng.choice([1, 1, 2, 8]))]
    return data, ", ".join(notes)


def run_case(target: str, pristine, file_name, case_dir, seed: int) -> tuple[str, str]:
    """Damage a copy of the target with `seed`, load it and generate; ("loaded" | "UserError", what was done)."""
    rng = random.Random(seed)
    if file_name is None:
        path = case_dir / pristine.name
        shutil.copy(pristine, path)
        damaged = path
    else:
        path = case_dir / pristine.name
        shutil.copytree(pristine, path)
        damaged = path / file_name
    data, note = mutate(target, bytearray(damaged.read_bytes()), rng)
    damaged.write_bytes(bytes(data))
    try:
        llm = load(str(path))
        llm.generate("Hello there", max_new_tokens=2, temperature=0, chat=target == "gguf" and seed % 2 == 0)
        return "loaded", note
    except UserError as e:
        assert "\n" not in str(e), f"{target} seed {seed} ({note}): message spans lines: {e}"
        return "UserError", note
    except Exception as e:  # the failure this test exists to find
        pytest.fail(f"{target} seed {seed} ({note}): {type(e).__name__}: {e}")
    finally:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize("target", ["float", "ours", "packed", "gguf", "config", "packed-config"])
def test_damaged_files_give_a_user_error_or_load(targets, target, tmp_path):
    pristine, file_name = targets[target]
    outcomes = Counter()
    start = time.perf_counter()
    for seed in range(CASES):
        outcome, note = run_case(target, pristine, file_name, tmp_path, seed)
        outcomes[outcome] += 1
        if target in ("ours", "packed") and note.startswith("flip") and "header" not in note:
            assert outcome == "UserError", f"{target} seed {seed}: {note} in tensor data went unnoticed"
    print(f"fuzz {target}: {CASES} cases, {dict(outcomes)}, {time.perf_counter() - start:.1f} s")
    assert sum(outcomes.values()) == CASES and outcomes["UserError"] > 0
