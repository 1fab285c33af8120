"""Random-weight models with real models' shapes, for the speed benchmarks (bench_gpu.py, bench.py).

Speed depends on shapes and formats, not on the values of the weights, so a
benchmark can run a 1B or 7B-shaped model that no machine here can download:
`hf_config(name)` gives the config.json of a known shape, `float_tensors`
random float weights for it, and `packed_tensors` the same model with every
decoder projection in the packed format of a tag, with codes drawn at random
in the format's valid range (labelled so wherever a number is reported).

Random codes cost a few seconds per 45M weights (NumPy packing); the methods
that need a Hessian (GPTQ, SpQR, QuIP, QuIP#) would take minutes at these
sizes, and their codes are stored in the same formats as random ones. A
projection shared by every layer would fit a GPU's L2 cache and read as
impossibly fast, so each layer gets its own arrays (`layer_copies`).

For the CPU benchmark (bench.py) a model is saved once: `save_random_model`
writes a float or random-code model directory with its shape's tokenizer
files (Llama 2's SentencePiece model, GPT-2's BPE), and `write_llama_gguf`
writes a Llama as an F16 GGUF with that vocabulary, which llama.cpp loads
and quantizes itself.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import sentencepiece

from runtime.formats.e8p import E8PTensor
from runtime.formats.incoherent import IncoherentTensor
from runtime.formats.int8 import Int8Tensor
from runtime.formats.lut4 import Lut4Tensor
from runtime.formats.sparse import SparseTensor
from runtime.formats.spqr import FP16_STATS, SpQRTensor, quantize_stats
from runtime.formats.uniform import PER_ROW, UniformTensor, group_index
from runtime import e8p_codebook
from runtime.checkpoints.atomic import atomic_directory
from runtime.checkpoints.checkpoint import save_checkpoint
from runtime.text.datasets import DATA_DIR
from runtime.checkpoints.rope_layout import half_split_to_interleaved
from runtime.checkpoints.packed_checkpoint import save_packed
from pipeline.quantize_model import HEAD_SPEC, bits_per_weight
from pipeline.tags import parse_tag
from runtime.method_contract import QuantSpec
from model import Config

# config.json fields of the shapes the benchmarks run (values from each model's published config.json).
SHAPES = {
    "tinyllama-1.1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
                           intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                           rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=2),
    "llama-2-7b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                       intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2),
    "opt-1.3b": dict(architectures=["OPTForCausalLM"], model_type="opt", hidden_size=2048, ffn_dim=8192,
                     num_hidden_layers=24, num_attention_heads=32, vocab_size=50272,
                     max_position_embeddings=2048, word_embed_proj_dim=2048, do_layer_norm_before=True,
                     activation_function="relu", enable_bias=True, bos_token_id=2, eos_token_id=2),
}
WEIGHT_STD = 0.02  # the init std of both families' reference code
NF4_TABLE = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                      -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                      0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                      0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
                     dtype=np.float32)  # QLoRA appendix E; values only set the scale of random codes


def hf_config(name: str) -> dict:
    """The config.json dict of the known shape `name` (a key of SHAPES)."""
    return dict(SHAPES[name])


def layer_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """{projection suffix: (out, in)} of one decoder layer."""
    d = config["hidden_size"]
    if config["model_type"] == "opt":
        return {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
                "self_attn.out_proj": (d, d), "fc1": (config["ffn_dim"], d), "fc2": (d, config["ffn_dim"])}
    hd = d // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd
    ffn = config["intermediate_size"]
    return {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
            "self_attn.o_proj": (d, d), "mlp.gate_proj": (ffn, d), "mlp.up_proj": (ffn, d),
            "mlp.down_proj": (d, ffn)}


def layer_prefix(config: dict, i: int) -> str:
    """Checkpoint name prefix of decoder layer i."""
    return f"model.decoder.layers.{i}." if config["model_type"] == "opt" else f"model.layers.{i}."


def global_tensors(config: dict, rng: np.random.Generator, dtype=np.float32) -> dict:
    """Embedding, final norm, LM head (and OPT's positions and biases of the final norm), random."""
    d, vocab = config["hidden_size"], config["vocab_size"]
    normal = lambda *shape: (rng.standard_normal(shape, dtype=np.float32) * WEIGHT_STD).astype(dtype)
    if config["model_type"] == "opt":
        return {"model.decoder.embed_tokens.weight": normal(vocab, d),
                "model.decoder.embed_positions.weight": normal(config["max_position_embeddings"] + 2, d),
                "model.decoder.final_layer_norm.weight": np.ones(d, dtype),
                "model.decoder.final_layer_norm.bias": np.zeros(d, dtype)}
    return {"model.embed_tokens.weight": normal(vocab, d), "model.norm.weight": np.ones(d, dtype),
            "lm_head.weight": normal(vocab, d)}


def layer_norms(config: dict, i: int) -> dict:
    """The norm weights (and OPT's biases) of decoder layer i: ones and zeros."""
    d, p = config["hidden_size"], layer_prefix(config, i)
    if config["model_type"] == "opt":
        out = {f"{p}{n}.{k}": (np.ones if k == "weight" else np.zeros)(d, np.float32)
               for n in ("self_attn_layer_norm", "final_layer_norm") for k in ("weight", "bias")}
        for name, (n_out, _) in layer_shapes(config).items():
            out[f"{p}{name}.bias"] = np.zeros(n_out, np.float32)
        return out
    return {f"{p}input_layernorm.weight": np.ones(d, np.float32),
            f"{p}post_attention_layernorm.weight": np.ones(d, np.float32)}


def float_tensors(config: dict, seed: int = 0, dtype=np.float32) -> dict:
    """Every tensor of the model, random normal weights (std 0.02) in `dtype`, norms in float32."""
    rng = np.random.default_rng(seed)
    tensors = global_tensors(config, rng, dtype)
    for i in range(config["num_hidden_layers"]):
        tensors.update(layer_norms(config, i))
        for name, shape in layer_shapes(config).items():
            tensors[f"{layer_prefix(config, i)}{name}.weight"] = (
                rng.standard_normal(shape, dtype=np.float32) * WEIGHT_STD).astype(dtype)
    return tensors


def random_uniform(spec: QuantSpec, shape, rng) -> UniformTensor:
    """Uniform-grid codes (rtn / gptq tags: bits, group, sym, act-order) drawn at random."""
    n_out, n_in = shape
    group = PER_ROW if spec.group_size in (0, PER_ROW) or "tensor" in spec.options else spec.group_size
    n_groups = 1 if group == PER_ROW else -(-n_in // group)
    maxq = (1 << spec.bits) - 1
    codes = rng.integers(0, maxq + 1, size=shape, dtype=np.uint8)  # [out, in]
    scales = rng.uniform(0.5, 1.5, size=(n_groups, n_out)).astype(np.float32) * WEIGHT_STD / maxq  # [g, out]
    zeros = (np.full((n_groups, n_out), (maxq + 1) // 2) if "sym" in spec.options
             else rng.integers(0, maxq + 1, size=(n_groups, n_out)))  # [g, out]
    g_idx = None
    if "act" in spec.options:
        g_idx = group_index(n_in, group)[rng.permutation(n_in)]  # [in] act-order: groups in a shuffled order
    return UniformTensor.from_codes(codes, scales, zeros, bits=spec.bits, group_size=group,
                                    sym="sym" in spec.options, g_idx=g_idx)


def random_lut4(spec: QuantSpec, shape, rng) -> Lut4Tensor:
    """NF4 / FP4 codes and block absmax (optionally double-quantized) drawn at random."""
    n_out, n_in = shape
    block = spec.group_size or 64
    qweight = rng.integers(0, 256, size=(n_out, n_in // 2), dtype=np.uint8)  # [out, in/2]
    table = NF4_TABLE if spec.method == "nf" else np.sort(rng.uniform(-1, 1, 16)).astype(np.float32)  # [16]
    absmax = rng.uniform(0.02, 0.08, size=(n_out, n_in // block)).astype(np.float32)  # [out, in/B]
    if "dq" not in spec.options:
        return Lut4Tensor(qweight, table, block, absmax=absmax)
    n_scales = -(-absmax.size // 256)
    return Lut4Tensor(qweight, table, block, absmax_q=rng.integers(0, 256, size=absmax.shape, dtype=np.uint8),
                      absmax_scale=rng.uniform(1e-4, 2e-4, n_scales).astype(np.float32),
                      absmax_mean=np.array([0.05], np.float32))


def random_int8(spec: QuantSpec, shape, rng) -> Int8Tensor:
    """int8 rows with per-row (absmax8: one) scales; LLM.int8's outlier threshold for `int`."""
    qweight = rng.integers(-127, 128, size=shape, dtype=np.int8)  # [out, in]
    if spec.method == "absmax":
        return Int8Tensor(qweight, np.array([WEIGHT_STD / 127], np.float32), "tensor", "tensor")
    scales = rng.uniform(0.5, 1.5, shape[0]).astype(np.float32) * WEIGHT_STD / 127  # [out]
    threshold = spec.values.get("t", 600) / 100 if spec.method == "int" else None
    return Int8Tensor(qweight, scales, "row", "token", threshold)


def random_spqr(spec: QuantSpec, shape, rng, outlier_fraction: float = 0.01) -> SpQRTensor:
    """SpQR base codes, quantized statistics and about 1% fp16 outliers, drawn at random."""
    n_out, n_in = shape
    group = spec.group_size or 16
    stat_bits = spec.values.get("s", 3)
    n_groups, maxq = -(-n_in // group), (1 << spec.bits) - 1
    codes = rng.integers(0, maxq + 1, size=shape, dtype=np.uint8)  # [out, in]
    scales = rng.uniform(0.5, 1.5, (n_groups, n_out)).astype(np.float32) * WEIGHT_STD / maxq  # [g, out]
    zeros = rng.uniform(0, maxq, (n_groups, n_out)).astype(np.float32)  # [g, out]
    if stat_bits != FP16_STATS:
        scales, zeros = quantize_stats(scales, stat_bits, 16), quantize_stats(zeros, stat_bits, 16)
    nnz = 0 if "dense" in spec.options else int(outlier_fraction * n_out * n_in)
    flat = rng.choice(n_out * n_in, size=nnz, replace=False)  # [nnz] distinct positions
    outliers = SparseTensor.from_entries(flat // n_in, flat % n_in,
                                         rng.standard_normal(nnz).astype(np.float32) * 0.1, shape)
    order = np.random.default_rng(n_in).permutation(n_in)  # [in] one per input size, as one layer input's
    # act order is shared by its products (q/k/v, gate/up), which then multiply in one call
    return SpQRTensor.from_codes(codes, order, scales, zeros, outliers, bits=spec.bits,
                                 group_size=group, stat_bits=stat_bits, stat_group=16)


def random_incoherent(spec: QuantSpec, shape, rng) -> IncoherentTensor:
    """QuIP: a per-row symmetric (midrise) uniform grid between seeded Kronecker orthogonal transforms."""
    inner = random_uniform(QuantSpec("rtn", spec.bits, 0, {"sym"}, {}), shape, rng)
    rescale = rng.uniform(0.5, 2.0, shape[1]).astype(np.float16)  # [in]
    return IncoherentTensor(inner, rescale, seed=int(rng.integers(1 << 30)), midrise=True)


def random_e8p(spec: QuantSpec, shape, rng) -> E8PTensor:
    """QuIP#: E8P codes (and the residual stage above 2 bits) with random signs."""
    n_out, n_in = shape
    stages = e8p_codebook.stage_codebooks(spec.bits)
    codes = [rng.integers(0, np.iinfo(s.code_dtype).max + 1, size=(n_out, n_in // 8)).astype(s.code_dtype)
             for s in stages]  # [out, in/8] each
    signs = lambda n: np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)  # [n] ±1
    return E8PTensor.from_codes(codes, e8p_codebook.stage_scales(spec.bits, WEIGHT_STD), signs(n_in), signs(n_out),
                                spec.bits, shape)


RANDOM_PACKERS = {"rtn": random_uniform, "gptq": random_uniform, "nf": random_lut4, "fp": random_lut4,
                  "int": random_int8, "absmax": random_int8, "smooth": random_int8, "spqr": random_spqr,
                  "quip": random_incoherent, "quipsharp": random_e8p}


def random_packed(tag: str, shape: tuple[int, int], seed: int = 0):
    """A packed tensor of the format `tag` quantizes to, shape (out, in), codes drawn at random."""
    spec = parse_tag(tag)
    return RANDOM_PACKERS[spec.method](spec, shape, np.random.default_rng(seed))


def packed_layer(config: dict, tag: str, seed: int = 0) -> dict:
    """{projection suffix: packed tensor} of one decoder layer in the format of `tag`, random codes."""
    return {name: random_packed(tag, shape, seed + k) for k, (name, shape) in enumerate(layer_shapes(config).items())}


def packed_tensors(config: dict, tag: str, seed: int = 0, layer_copies=None) -> dict:
    """Every tensor of the model with its projections packed as `tag` (random codes). One layer is packed;
    the others are `layer_copies(packed)` of it (default: the same objects; pass e.g. a device copy so each
    layer has its own memory). The LM head is 8-bit per row and the embedding float16, as our builds store them."""
    rng = np.random.default_rng(seed)
    tensors = global_tensors(config, rng)
    head_name = "lm_head.weight" if "lm_head.weight" in tensors else "model.decoder.embed_tokens.weight"
    tensors["lm_head.weight"] = random_uniform(QuantSpec("rtn", 8, 0, {"sym"}, {}),
                                               tensors[head_name].shape, rng)
    for name in [k for k in tensors if k.endswith("embed_tokens.weight")]:
        tensors[name] = tensors[name].astype(np.float16)
    layer = packed_layer(config, tag, seed)
    copy = layer_copies or (lambda packed: packed)
    for i in range(config["num_hidden_layers"]):
        tensors.update(layer_norms(config, i))
        tensors.update({f"{layer_prefix(config, i)}{name}.weight": copy(packed) for name, packed in layer.items()})
    return tensors



def tokenizer_files(config: dict) -> list[Path]:
    """The tokenizer files (../shared/data/tokenizers) of a known shape: Llama 2's SentencePiece model for
    the Llama shapes (its 32000 pieces are TinyLlama's and Llama 2's vocabulary), GPT-2's BPE for OPT."""
    if config["model_type"] == "opt":
        return [DATA_DIR / "tokenizers" / "gpt2" / "encoder.json", DATA_DIR / "tokenizers" / "gpt2" / "vocab.bpe"]
    return [DATA_DIR / "tokenizers" / "llama2" / "tokenizer.model"]


def save_random_model(directory, config: dict, tag: str | None = None, seed: int = 0) -> None:
    """Write a random-weight model of `config` into `directory` atomically, with its shape's tokenizer files:
    float32 weights when `tag` is None, else every projection packed as `tag` with random codes (its
    config.json's quantization section says `random_codes`)."""
    with atomic_directory(directory) as tmp:
        if tag is None:
            save_checkpoint(tmp, config, float_tensors(config, seed))
        else:
            spec = parse_tag(tag)
            tensors = packed_tensors(config, tag, seed)
            quantization = {"method": spec.method, "bits": spec.bits, "group_size": spec.group_size,
                            "options": sorted(spec.options), **({"values": spec.values} if spec.values else {}),
                            "random_codes": True, "lm_head": HEAD_SPEC.tag, "embed_tokens": "float16",
                            "bits_per_weight": round(bits_per_weight(Config.from_hf(config), tensors), 4)}
            save_packed(tmp, dict(config, quantization=quantization), tensors)
        for source in tokenizer_files(config):
            shutil.copyfile(source, tmp / source.name)


def sentencepiece_vocabulary(tokenizer_model: Path) -> tuple[list, list, list]:
    """(pieces, scores, GGUF token types) of a SentencePiece model, in id order."""
    import gguf  # here, not at the top: bench_gpu.py runs where gguf is not installed
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    ids = range(sp.vocab_size())
    kinds = [gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
             else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.UNUSED if sp.is_unused(i)
             else gguf.TokenType.NORMAL for i in ids]
    return [sp.id_to_piece(i) for i in ids], [sp.get_score(i) for i in ids], kinds


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_tensors(config: dict, tensors: dict) -> dict:
    """{GGUF name: array} of a Llama's HF-named float tensors: matrices in float16, norms in float32, Q and K
    rows in llama.cpp's interleaved RoPE order (as its converter writes them)."""
    heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}
    out = {"token_embd.weight": tensors["model.embed_tokens.weight"], "output_norm.weight": tensors["model.norm.weight"],
           "output.weight": tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])}
    for i in range(config["num_hidden_layers"]):
        for hf, short in GGUF_NAMES.items():
            weight = tensors[f"model.layers.{i}.{hf}.weight"]
            out[f"blk.{i}.{short}.weight"] = half_split_to_interleaved(weight, heads[hf]) if hf in heads else weight
    return {name: np.asarray(w, np.float16 if w.ndim == 2 else np.float32) for name, w in out.items()}


def write_llama_gguf(path: Path, config: dict, tensors: dict, tokenizer_model: Path) -> None:
    """Write a Llama's float tensors as an F16 GGUF that llama.cpp loads (llama architecture metadata and the
    SentencePiece vocabulary of `tokenizer_model`), atomically: under a temporary name, then renamed."""
    import gguf  # see sentencepiece_vocabulary

    from runtime.checkpoints.export.gguf import write_gguf
    path = Path(path)
    pieces, scores, kinds = sentencepiece_vocabulary(tokenizer_model)

    def fill(writer):
        writer.add_name(path.stem)
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
        writer.add_head_count(config["num_attention_heads"])
        writer.add_head_count_kv(config["num_key_value_heads"])
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
        writer.add_rope_freq_base(config["rope_theta"])
        writer.add_vocab_size(config["vocab_size"])
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces[:config["vocab_size"]])
        writer.add_token_scores(scores[:config["vocab_size"]])
        writer.add_token_types(kinds[:config["vocab_size"]])
        writer.add_bos_token_id(config["bos_token_id"])
        writer.add_eos_token_id(config["eos_token_id"])
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        for name, array in gguf_tensors(config, tensors).items():
            writer.add_tensor(name, array)

    write_gguf(path, fill)
