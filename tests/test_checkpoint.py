"""Tests for runtime.checkpoints.checkpoint: tiny transformers models saved every way HF saves them, loaded back exactly."""
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors.numpy
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from runtime.checkpoints.checkpoint import load_checkpoint, load_checkpoint_with_metadata, save_checkpoint
from runtime.errors import UserError

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "models" / "stories260K" / "stories260K.bin"


def tiny_llama(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(config).to(dtype)


def expected_tensors(model) -> dict[str, np.ndarray]:
    """The model's state dict as float32 NumPy, without the tied lm_head save_pretrained drops."""
    state = {name: t.detach().float().numpy() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


def assert_loads_exactly(directory: Path, model) -> dict:
    config, tensors = load_checkpoint(directory)
    expected = expected_tensors(model)
    assert tensors.keys() == expected.keys()
    for name, value in expected.items():
        assert tensors[name].dtype == np.float32 and np.array_equal(tensors[name], value), name
    assert config["hidden_size"] == model.config.hidden_size
    return tensors


def test_safetensors_directory(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    tensors = assert_loads_exactly(tmp_path, model)
    assert all(isinstance(t, np.memmap) for t in tensors.values())  # float32 stays mapped, not copied
    config, _ = load_checkpoint(tmp_path / "model.safetensors")  # the weight file names its directory
    assert config["num_key_value_heads"] == 2
    assert config["rope_theta"] == 10000.0  # transformers 5 nests it in rope_parameters


def test_sharded_safetensors(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert_loads_exactly(tmp_path, model)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_widened_to_float32(tmp_path, dtype):
    model = tiny_llama(dtype)
    model.save_pretrained(tmp_path)
    assert_loads_exactly(tmp_path, model)


def test_pytorch_model_bin(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert_loads_exactly(tmp_path, model)


def test_sharded_pytorch_model_bin(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    names = list(model.state_dict())
    shards = {"pytorch_model-00001-of-00002.bin": names[:10], "pytorch_model-00002-of-00002.bin": names[10:]}
    for shard, shard_names in shards.items():
        torch.save({name: model.state_dict()[name] for name in shard_names}, tmp_path / shard)
    weight_map = {name: shard for shard, shard_names in shards.items() for name in shard_names}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_loads_exactly(tmp_path, model)


def test_old_opt_names_become_hf_names(tmp_path):
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                     vocab_size=64, max_position_embeddings=32, word_embed_proj_dim=16))
    model.config.save_pretrained(tmp_path)
    old_names = {name.removeprefix("model."): t for name, t in model.state_dict().items() if name != "lm_head.weight"}
    assert all(name.startswith("decoder.") for name in old_names)
    torch.save(old_names, tmp_path / "pytorch_model.bin")  # how facebook/opt-* checkpoints name tensors
    assert_loads_exactly(tmp_path, model)


def test_gguf_file_dispatch(tmp_path):
    embedding = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)  # [vocab, dim]
    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    for add, value in ((writer.add_block_count, 0), (writer.add_context_length, 64),
                       (writer.add_embedding_length, 8), (writer.add_feed_forward_length, 16),
                       (writer.add_head_count, 2), (writer.add_layer_norm_rms_eps, 1e-5)):
        add(value)
    writer.add_tensor("token_embd.weight", embedding)
    writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config, tensors = load_checkpoint(tmp_path / "m.gguf")
    assert config["vocab_size"] == 16 and config["tie_word_embeddings"]
    assert np.array_equal(tensors["model.embed_tokens.weight"], embedding)


def test_llama2c_file_dispatch():
    if not STORIES.is_file():
        pytest.skip(f"{STORIES} is not available")
    config, tensors = load_checkpoint(STORIES)
    assert config["hidden_size"] == 64 and tensors["model.embed_tokens.weight"].shape == (512, 64)


def test_saved_checkpoint_is_read_by_transformers_and_safetensors(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "original")
    config, tensors = load_checkpoint(tmp_path / "original")
    save_checkpoint(tmp_path / "saved", config, tensors, {"quantization": json.dumps({"bits": 4})})
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == config
    on_disk = safetensors.numpy.load_file(tmp_path / "saved" / "model.safetensors")
    assert all(np.array_equal(on_disk[name], t) for name, t in tensors.items()) and on_disk.keys() == tensors.keys()
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "saved")
    assert all(torch.equal(reloaded.state_dict()[name], t) for name, t in model.state_dict().items())
    _, again, metadata = load_checkpoint_with_metadata(tmp_path / "saved")
    assert json.loads(metadata["quantization"]) == {"bits": 4}
    assert all(np.array_equal(again[name], t) for name, t in tensors.items())


def test_to_float32_false_keeps_stored_dtypes(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "original")
    config, tensors = load_checkpoint(tmp_path / "original")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float16)
    save_checkpoint(tmp_path / "saved", config, tensors)
    _, stored, _ = load_checkpoint_with_metadata(tmp_path / "saved", to_float32=False)
    assert stored["model.norm.weight"].dtype == np.float16
    assert stored["model.embed_tokens.weight"].dtype == np.float32
    _, widened = load_checkpoint(tmp_path / "saved")
    assert {t.dtype for t in widened.values()} == {np.dtype(np.float32)}


@pytest.mark.parametrize("problem, message", [
    ("no_config", "has no config.json"),
    ("no_weights", "no weights"),
    ("bad_config", "config.json is not valid JSON"),
    ("missing_shard", "model-00002-of-.* is missing"),
    ("truncated", "model.safetensors is truncated or corrupt"),
    ("bad_header", "model.safetensors is truncated or corrupt"),
    ("no_such_path", "does not exist"),
    ("unknown_file", "not a model this runtime reads"),
])
def test_bad_inputs_raise_one_line_user_errors(tmp_path, problem, message):
    model = tiny_llama()
    directory = tmp_path / "model"
    model.save_pretrained(directory, max_shard_size="20KB" if problem == "missing_shard" else "50GB")
    path = directory
    if problem == "no_config":
        (directory / "config.json").unlink()
    elif problem == "no_weights":
        (directory / "model.safetensors").unlink()
    elif problem == "bad_config":
        (directory / "config.json").write_text('{"hidden_size": 32,')
    elif problem == "missing_shard":
        next(directory.glob("model-00002-of-*.safetensors")).unlink()
    elif problem == "truncated":
        weights = directory / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif problem == "bad_header":
        weights = directory / "model.safetensors"
        raw = bytearray(weights.read_bytes())
        raw[8:12] = b"\x00\xff{["
        weights.write_bytes(bytes(raw))
    elif problem == "no_such_path":
        path = tmp_path / "nowhere"
    else:
        path = tmp_path / "notes.txt"
        path.write_text("hello")
    with pytest.raises(UserError, match=message) as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)
