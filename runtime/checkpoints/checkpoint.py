"""Load any supported checkpoint as (HF-style config, HF-named NumPy tensors); save one.

Accepted inputs (the layout `transformers`' `save_pretrained` writes, and two
single-file formats):

    <dir>/config.json + model.safetensors
    <dir>/config.json + model.safetensors.index.json + its shards
    <dir>/config.json + pytorch_model.bin
    <dir>/config.json + pytorch_model.bin.index.json + its shards
    <file>.gguf            llama architecture (runtime.checkpoints.gguf_io)
    <file>.bin             llama2.c legacy checkpoint (runtime.checkpoints.llama2c)

A sharded index is the JSON `{"metadata": {...}, "weight_map": {tensor name:
shard file name}}`. Tensor names follow HF transformers; old OPT checkpoints
that name their tensors "decoder.*" are renamed to "model.decoder.*", as
OPTForCausalLM names them. Every tensor name, shape and dtype is checked
against config.json (runtime.checkpoints.config_schema) before the tensors are returned.
Saved models are one directory: config.json + model.safetensors (with the
CRC-32 of every tensor, checked on first use: runtime.checkpoints.content_hash), each
file written atomically.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from runtime.checkpoints.config_schema import check_tensors
from runtime.checkpoints.content_hash import run_pending
from runtime.errors import UserError
from runtime.checkpoints.llama2c import load_llama2c
from runtime.checkpoints.atomic import atomic_file
from runtime.checkpoints.safetensors_io import corrupt, read_safetensors, require_regular_file, write_safetensors
from runtime.checkpoints.torch_pickle import load_torch_state_dict

# Weight files of an HF model directory, in the order they are looked for.
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
GGUF_MAGIC = b"GGUF"


def read_json(path: Path, fix: str = "fix it or re-download the model") -> dict:
    """A JSON object from `path`; UserError (ending in `fix`) when it is not one."""
    require_regular_file(path, fix)
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} does not hold a JSON object; {fix}")
    return value


def read_weight_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of one safetensors or pytorch_model.bin file (a whole model or one shard)."""
    if not path.exists():
        raise UserError(f"{path} is missing; re-download the model (all shards the index lists)")
    require_regular_file(path)
    if path.name.endswith(".safetensors"):
        return read_safetensors(path)
    return load_torch_state_dict(path), {}


def read_sharded(index_path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors of every shard an index lists, checking each listed tensor is where the index says."""
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index_path} has no weight_map; fix it or re-download the model")
    tensors, metadata = {}, {}
    for shard in dict.fromkeys(weight_map.values()):
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise UserError(f"{index_path} names shard {shard!r}, not a file beside it; fix or re-download it")
        shard_tensors, shard_metadata = read_weight_file(index_path.parent / shard)
        tensors.update(shard_tensors)
        metadata.update(shard_metadata)
    missing = [name for name in weight_map if name not in tensors]
    if missing:
        shard = index_path.parent / weight_map[missing[0]]
        raise corrupt(shard, f"tensor {missing[0]!r} listed in the index is absent")
    return tensors, metadata


def normalize_config(config: dict) -> dict:
    """Fill the older key names transformers 5 no longer writes: rope_theta (now inside
    rope_parameters) and torch_dtype (now dtype), so every config reads the same."""
    config = dict(config)
    rope = config.get("rope_parameters")
    if "rope_theta" not in config and isinstance(rope, dict) and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if "torch_dtype" not in config and "dtype" in config:
        config["torch_dtype"] = config["dtype"]
    return config


def load_directory(directory: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """Config, tensors and safetensors metadata of an HF model directory."""
    if not (directory / "config.json").exists():
        raise UserError(f"{directory} has no config.json; point at a Hugging Face model directory "
                        "(config.json + model.safetensors), a .gguf file or a llama2.c .bin file")
    config = normalize_config(read_json(directory / "config.json"))
    for name in (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX):
        if (directory / name).exists():
            loader = read_sharded if name.endswith(".index.json") else read_weight_file
            return (config, *loader(directory / name))
    raise UserError(f"{directory} has a config.json but no weights ({SAFETENSORS}, {TORCH_BIN} or a sharded "
                    "index); download the weight files too")


def hf_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename old OPT checkpoints' "decoder.*" tensors to OPTForCausalLM's "model.decoder.*"."""
    return {f"model.{name}" if name.startswith("decoder.") else name: t for name, t in tensors.items()}


def read_directly(name: str, tensors: dict) -> bool:
    """True for a tensor the forward pass reads without runtime.linear: norms, biases and embeddings,
    except an embedding that is also the (tied) LM head. Their checksums are checked at load."""
    if not hasattr(tensors[name], "ndim"):
        return False
    tied_head = name.endswith("embed_tokens.weight") and "lm_head.weight" not in tensors
    return tensors[name].ndim < 2 or ("embed_" in name and not tied_head)


def as_float32(array: np.ndarray) -> np.ndarray:
    """Float tensors as float32 (a float32 memmap stays a view); integer and bool tensors unchanged."""
    return array.astype(np.float32, copy=False) if np.issubdtype(array.dtype, np.floating) else array


def load_checkpoint_with_metadata(path: str | os.PathLike, to_float32: bool = True
                                  ) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """Load a checkpoint; return (config, {HF name: array}, the safetensors `__metadata__`).

    The metadata dict merges all shards' and is empty for formats without it.
    With `to_float32` False, tensors keep their stored dtype (a packed model's
    float16 scales stay float16); bfloat16 is always widened to float32.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; check the model path")
    if path.is_file() and path.name in (SAFETENSORS, TORCH_BIN):
        path = path.parent
    if path.is_dir():
        config, tensors, metadata = load_directory(path)
        sources = (str(path / "config.json"), str(path))
    else:
        require_regular_file(path)
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == GGUF_MAGIC:
            from runtime.checkpoints.gguf_io import load_gguf  # the gguf package only for GGUF files

            config, tensors = load_gguf(path)
        elif path.suffix == ".bin" and not zipfile.is_zipfile(path):
            config, tensors = load_llama2c(path)
        else:
            raise UserError(f"{path} is not a model this runtime reads: give a Hugging Face model directory, "
                            "a .gguf file or a llama2.c .bin file")
        metadata = {}
        sources = (str(path), str(path))
    tensors = hf_names(tensors)
    check_tensors(config, tensors, sources[1], sources[0])
    for name, t in tensors.items():
        if read_directly(name, tensors) or (to_float32 and t.dtype not in (np.float32, np.bool_)):  # copied
            run_pending(t)
    if to_float32:
        tensors = {name: as_float32(t) for name, t in tensors.items()}
    return config, tensors, metadata


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Load a checkpoint; return (HF-style config dict, {HF name: array}), float tensors as float32."""
    config, tensors, _ = load_checkpoint_with_metadata(path)
    return config, tensors


def save_checkpoint(directory: str | os.PathLike, config: dict, tensors: dict[str, np.ndarray],
                    metadata: dict[str, str] | None = None) -> None:
    """Write `directory`/config.json and model.safetensors (with `metadata`), each atomically.

    The weights are written first, so a config.json on disk always has its
    weights beside it. Other files in the directory (tokenizer files) are kept.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / SAFETENSORS, tensors, metadata)
    with atomic_file(directory / "config.json") as f:
        f.write((json.dumps(config, indent=2) + "\n").encode("utf-8"))
