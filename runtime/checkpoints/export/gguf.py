"""Export a uniform-format Llama as a GGUF file llama.cpp runs (Q4_0, Q4_1, Q8_0 blocks).

The uniform grids of 4-bit groups that are whole blocks of 32 inputs are
llama.cpp's block formats (ggml-common.h `block_q4_0`, `block_q4_1`,
`block_q8_0`; ggml's docs/gguf.md for the file), one block per 32 weights of
a row:

    Q4_0  18 bytes: d fp16, qs[16]  value = (q - 8) * d       symmetric 4-bit: q = code, d = scale
    Q4_1  20 bytes: d fp16, m fp16, qs[16]  value = q * d + m  asymmetric: m = -d * zero (rounded to fp16)
    Q8_0  34 bytes: d fp16, qs int8[32]  value = qs * d        8-bit symmetric: qs = code - 128, d = scale

with qs[j] holding weight j in its low nibble and weight j + 16 in its high
nibble. So a 4-bit model without act-order, with groups that are a multiple
of 32 (or one per row), is written exactly (Q4_1 within the fp16 rounding
of m); an 8-bit projection is written exactly when symmetric, else
re-quantized to Q8_0 (within its rounding). The LM head (8-bit, per row,
symmetric) is Q8_0 exactly, the embedding F16, norms F32. Q and K rows go
into llama.cpp's interleaved RoPE order (runtime/checkpoints/gguf_io.py). The
tokenizer is embedded: a SentencePiece tokenizer.model as "llama" (pieces,
scores), a byte-level BPE tokenizer.json as "gpt2" (tokens, merges;
pre-tokenizer "smollm" when it splits digits one by one, else "gpt2"), a
SentencePiece model converted to tokenizer.json (byte fallback) as "llama".
Everything else (2/3-bit codes, act-order, other formats, OPT) is refused
with the list of what can be exported.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np

from runtime.checkpoints.atomic import temporary_name
from runtime.errors import UserError
from runtime.formats.uniform import PER_ROW, UniformTensor, unpack
from runtime.checkpoints.rope_layout import half_split_to_interleaved

BLOCK = 32
EXPORTABLE = ("uniform-format Llama models with 4-bit codes, no act-order, groups a multiple of 32 or one per row "
              "(rtn4g32sym, gptq4g32sym -> Q4_0; rtn4g32, gptq4g128 -> Q4_1), or 8-bit codes (-> Q8_0)")
NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
Q = gguf.GGMLQuantizationType


def refuse(model_dir: Path, what: str) -> UserError:
    return UserError(f"{model_dir}: {what} cannot be written as GGUF; exportable are {EXPORTABLE}")


def block_params(packed: UniformTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [out, in] int64, scale [out, in/32] float16, zero [out, in/32] int64) of each block of 32."""
    n_out, n_in = packed.shape
    codes = unpack(np.asarray(packed.qweight), packed.bits, n_in).T.astype(np.int64)  # [out, in]
    zeros = unpack(np.ascontiguousarray(np.asarray(packed.qzeros).T), packed.bits, n_out).T  # [groups, out]
    group = n_in if packed.group_size == PER_ROW else packed.group_size
    groups = np.arange(n_in // BLOCK) * BLOCK // group  # [in/32]
    return codes, np.asarray(packed.scales)[groups].T, zeros[groups].T.astype(np.int64)


def nibbles(q: np.ndarray) -> np.ndarray:
    """4-bit values [out, blocks, 32] -> qs bytes [out, blocks, 16]: weight j low nibble, j + 16 high."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def halves(values: np.ndarray) -> np.ndarray:
    """float16 [out, blocks] -> its bytes [out, blocks, 2] (little-endian)."""
    return np.ascontiguousarray(values.astype("<f2")).view(np.uint8).reshape(*values.shape, 2)


def encode(packed: UniformTensor, model_dir: Path, name: str) -> tuple[np.ndarray, int]:
    """(bytes [out, blocks * block size], GGML type) of one uniform projection."""
    n_out, n_in = packed.shape
    if packed.bits not in (4, 8) or packed.act_order or n_in % BLOCK:
        raise refuse(model_dir, f"{name} ({packed.bits}-bit{', act-order' if packed.act_order else ''}, "
                                f"{n_in} inputs)")
    if packed.bits == 8 and not packed.sym:
        w = packed.dequantize()  # [out, in] re-quantized: within Q8_0's rounding
        return gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0
    codes, d, zero = block_params(packed)
    blocks = codes.reshape(n_out, n_in // BLOCK, BLOCK)  # [out, blocks, 32]
    if packed.bits == 8:
        qs = (blocks - 128).astype(np.int8).view(np.uint8)  # [out, blocks, 32]
        parts, kind = [halves(d), qs], Q.Q8_0
    elif packed.sym:
        parts, kind = [halves(d), nibbles(blocks)], Q.Q4_0
    else:
        m = -(d.astype(np.float32) * zero)  # [out, blocks]
        parts, kind = [halves(d), halves(m.astype(np.float16)), nibbles(blocks)], Q.Q4_1
    return np.concatenate(parts, axis=2).reshape(n_out, -1), kind


def bpe_vocabulary(path: Path) -> dict:
    """The GGUF vocabulary of a BPE tokenizer.json: byte-level ones as "gpt2" (tokens, merges, pre-tokenizer),
    SentencePiece ones converted to BPE (byte fallback) as "llama", with score -id (SentencePiece orders its
    pieces by score, so the merge priorities are kept)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{path}: only BPE tokenizer.json files can be embedded in GGUF")
    vocab = dict(model["vocab"])
    special = set()
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    tokens = [None] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    if "ByteLevel" in json.dumps(data.get("pre_tokenizer")):
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        digits = "individual_digits\": true" in json.dumps(data.get("pre_tokenizer"))
        types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
        return {"model": "gpt2", "pre": "smollm" if digits else "gpt2", "tokens": tokens, "types": types,
                "merges": merges}
    if not model.get("byte_fallback"):
        raise UserError(f"{path}: a BPE tokenizer that is neither byte-level nor SentencePiece cannot be embedded")
    types = [gguf.TokenType.UNKNOWN if t == model.get("unk_token") else gguf.TokenType.CONTROL if i in special
             else gguf.TokenType.BYTE if len(t) == 6 and t.startswith("<0x") and t.endswith(">")
             else gguf.TokenType.NORMAL for i, t in enumerate(tokens)]
    return {"model": "llama", "tokens": tokens,
            "scores": [-float(i) for i in range(len(tokens))], "types": types}


def llama_vocabulary(path: Path) -> dict:
    """Pieces, scores and types of a SentencePiece tokenizer.model."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    ids = range(sp.get_piece_size())
    types = [gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
             else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.UNUSED if sp.is_unused(i)
             else gguf.TokenType.NORMAL for i in ids]
    return {"model": "llama", "tokens": [sp.id_to_piece(i) for i in ids], "scores": [sp.get_score(i) for i in ids],
            "types": types}


def vocabulary(model_dir: Path, vocab_size: int) -> dict:
    """The tokenizer of `model_dir` as GGUF metadata values, padded to `vocab_size` tokens."""
    if (model_dir / "tokenizer.model").is_file():
        vocab = llama_vocabulary(model_dir / "tokenizer.model")
    elif (model_dir / "tokenizer.json").is_file():
        vocab = bpe_vocabulary(model_dir / "tokenizer.json")
    else:
        raise UserError(f"{model_dir} has no tokenizer.json or tokenizer.model to embed in the GGUF file")
    extra = vocab_size - len(vocab["tokens"])
    if extra < 0:
        raise UserError(f"{model_dir}: the tokenizer has {len(vocab['tokens'])} tokens, more than the model's "
                        f"{vocab_size}")
    vocab["tokens"] += [f"[PAD{len(vocab['tokens']) + i}]" for i in range(extra)]
    vocab["types"] += [gguf.TokenType.UNUSED] * extra
    if "scores" in vocab:
        vocab["scores"] += [0.0] * extra
    return vocab


def tokenizer_settings(model_dir: Path) -> dict:
    """tokenizer_config.json's values (add_bos_token, chat_template) when present."""
    path = model_dir / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_metadata(writer: gguf.GGUFWriter, config: dict, vocab: dict, settings: dict, file_type) -> None:
    """The llama.* and tokenizer.ggml.* keys llama.cpp (and runtime/checkpoints/gguf_io.py) read."""
    heads = config["num_attention_heads"]
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    writer.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        value = config.get(key)
        if isinstance(value, list):
            value = value[0]
        if value is not None:
            add(value)
    writer.add_add_bos_token(bool(settings.get("add_bos_token", vocab["model"] == "llama")))
    writer.add_add_eos_token(False)
    if isinstance(settings.get("chat_template"), str):
        writer.add_chat_template(settings["chat_template"])


def export(model_dir: Path, config: dict, tensors: dict, out: Path) -> None:
    """Write the Llama model `config` / `tensors` (loaded from `model_dir`) as the GGUF file `out`."""
    if config.get("model_type") != "llama" and "LlamaForCausalLM" not in config.get("architectures", []):
        raise refuse(model_dir, f"architecture {config.get('model_type')!r}")
    heads = {"self_attn.q_proj": config["num_attention_heads"],
             "self_attn.k_proj": config.get("num_key_value_heads") or config["num_attention_heads"]}
    renamed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
    encoded, kinds = {}, set()
    for name, value in tensors.items():
        if name in renamed:
            target = renamed[name]
        else:
            parts = name.split(".")  # model.layers.N.<module...>.weight
            module = ".".join(parts[3:-1])
            if parts[:2] != ["model", "layers"] or module not in NAMES or parts[-1] != "weight":
                raise refuse(model_dir, f"tensor {name}")
            target = f"blk.{parts[2]}.{NAMES[module]}.weight"
        if hasattr(value, "ndim"):
            array = np.asarray(value, dtype=np.float16 if value.ndim == 2 else np.float32)
            kind = None
        elif isinstance(value, UniformTensor):
            array, kind = encode(value, model_dir, name)
            if name != "lm_head.weight":
                kinds.add(kind)
        else:
            raise refuse(model_dir, f"{name} ({type(value).__name__})")
        module = ".".join(name.split(".")[3:-1])
        if module in heads:
            array = half_split_to_interleaved(array, heads[module])
        encoded[target] = (array, kind)
    file_types = {Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
                  Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
    file_type = file_types[sorted(kinds)[0]] if kinds else gguf.LlamaFileType.MOSTLY_F16
    vocab = vocabulary(Path(model_dir), config["vocab_size"])

    def fill(writer):
        write_metadata(writer, config, vocab, tokenizer_settings(Path(model_dir)), file_type)
        for target, (array, kind) in encoded.items():
            writer.add_tensor(target, array, raw_dtype=kind)

    write_gguf(Path(out), fill)


def write_gguf(path: Path, fill) -> None:
    """Write a llama-architecture GGUF atomically: `fill(writer)` adds the metadata and tensors to a
    gguf.GGUFWriter on a temporary name beside `path`, renamed onto `path` once the file is complete."""
    tmp = temporary_name(path, "tmp")
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
