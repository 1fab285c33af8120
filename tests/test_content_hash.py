"""Checksums of the models we write: recorded on save, checked on first use and by --verify."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, save_tiny_llama
from pipeline.api import load
from runtime.checkpoints.checkpoint import load_checkpoint, save_checkpoint
from runtime.checkpoints.content_hash import HASH_KEY
from runtime.errors import UserError
from pipeline.quantize_model import build_quantized
from runtime.checkpoints.safetensors_io import read_safetensors
from pipeline.tags import parse_tag
from runtime.checkpoints.verify import verify_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(float model written by us, packed model written by us, float model written by transformers)."""
    root = tmp_path_factory.mktemp("hash")
    save_tiny_llama(root / "hf", num_hidden_layers=2, max_position_embeddings=32)
    shutil.copytree(root / "hf", root / "ours")
    save_checkpoint(root / "ours", *load_checkpoint(root / "hf"))
    build_quantized(root / "hf", parse_tag("rtn4"), root / "packed", progress=False)
    return root / "ours", root / "packed", root / "hf"


def flipped(model, tmp_path, tensor: str):
    """A copy of `model` with one byte of the stored tensor `tensor` flipped."""
    copy = tmp_path / model.name
    shutil.copytree(model, copy)
    path = copy / "model.safetensors"
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + n])[tensor]["data_offsets"]
    raw[8 + n + (begin + end) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    return copy


def test_every_model_we_write_records_a_checksum_of_every_tensor(models):
    for model in models[:2]:
        arrays, _ = read_safetensors(model / "model.safetensors")
        raw = (model / "model.safetensors").read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        assert json.loads(header["__metadata__"][HASH_KEY]).keys() == arrays.keys()


@pytest.mark.parametrize("which, tensor", [
    (0, "model.layers.1.mlp.down_proj.weight"),   # checked on first use, by the forward pass
    (0, "model.embed_tokens.weight"),             # tied LM head: checked on first use
    (0, "model.layers.0.input_layernorm.weight"),  # read directly: checked at load
    (1, "model.layers.0.self_attn.q_proj.weight.qweight"),
    (1, "model.layers.1.mlp.up_proj.weight.scales"),
    (1, "model.embed_tokens.weight"),             # float16 embedding of a packed model: at load
    (1, "lm_head.weight.qweight"),
])
def test_a_flipped_byte_is_a_one_line_error_naming_file_and_tensor(models, tmp_path, which, tensor):
    model = flipped(models[which], tmp_path, tensor)
    name = tensor.rsplit(".", 1)[0] if which == 1 and tensor.endswith(("qweight", "scales")) else tensor
    with pytest.raises(UserError, match=f"model.safetensors: tensor '{name}.*' does not match its recorded "
                                        "checksum") as error:
        load(str(model)).generate("Hello", max_new_tokens=2, temperature=0)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="does not match its recorded checksum"):
        verify_model(model)


def test_verify_reads_models_without_checksums_in_full(models, tmp_path):
    assert "all 21 tensors are complete and finite (the file records no checksums)" in verify_model(models[2])
    assert "checked against their recorded checksums" in verify_model(models[1])
    config, tensors = load_checkpoint(models[2])
    tensors = dict(tensors, **{"model.layers.0.mlp.up_proj.weight": np.full((32, 16), np.nan, np.float32)})
    shutil.copytree(models[2], tmp_path / "nan")
    save_checkpoint(tmp_path / "nan", config, tensors)
    with pytest.raises(UserError, match="tensor 'model.layers.0.mlp.up_proj.weight' holds NaN"):
        load(str(tmp_path / "nan"), verify=True)


def test_run_verify_prints_the_summary_or_one_line_error(models, tmp_path):
    run = [sys.executable, str(ROOT / "run.py"), "--verify", "--model"]
    ok = subprocess.run(run + [str(models[1])], capture_output=True, text=True)
    assert ok.returncode == 0 and "tensors are complete and finite" in ok.stdout
    bad = subprocess.run(run + [str(flipped(models[0], tmp_path, "model.norm.weight"))], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "'model.norm.weight' does not match" in bad.stderr
