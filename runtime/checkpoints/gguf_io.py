"""Load a llama-architecture GGUF file as an HF-style config and HF-named float32 tensors.

Follows the GGUF spec (ggml docs/gguf.md: key names `llama.*`, `tokenizer.ggml.*`,
tensor names `token_embd`, `blk.N.attn_q`, ...) and undoes the one layout change
llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) makes to
Hugging Face weights: it reorders the rows of attn_q and attn_k so that RoPE
rotates adjacent pairs (x0, x1), (x2, x3), ... as in Meta's original Llama,
instead of HF's halves (x0, x_{d/2}), (x1, x_{d/2+1}), ...:

    gguf_rows = hf.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)

so within each head, GGUF row 2j is HF row j and GGUF row 2j+1 is HF row
j + head_dim/2. runtime/checkpoints/rope_layout.py inverts it (llama2.c's wq/wk
use the same interleaved order). Quantized tensors are dequantized with the
`gguf` package's reference NumPy code (`gguf.quants.dequantize`).

Metadata comes from an untrusted file: every value is read through
`metadata_value` with the kind it must have (a string that is valid UTF-8, a
positive count, a list of strings, ...), so a damaged or hostile file fails
in one line naming the key.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import gguf
import numpy as np

from runtime.errors import UserError
from runtime.checkpoints.rope_layout import interleaved_to_half_split
from runtime.checkpoints.safetensors_io import corrupt, require_regular_file

# GGUF tensor names outside the blocks -> HF names.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# GGUF per-block tensor names -> HF per-layer names.
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


# What a metadata value of each kind must be: (test, description for the error).
KINDS = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "int": (is_int, "an integer"),
    "size": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "count": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "float": (is_number, "a finite number"),
    "strs": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "an array of strings"),
    "ints": (lambda v: isinstance(v, list) and all(is_int(i) for i in v), "an array of integers"),
    "floats": (lambda v: isinstance(v, list) and all(is_number(f) for f in v), "an array of finite numbers"),
}


def metadata_value(reader: gguf.GGUFReader, key: str, default=None, kind: str | None = None):
    """The value of a GGUF metadata key (a Python scalar, str or list), or `default` when absent.

    With `kind` (a key of KINDS) the value must be of that kind; UserError otherwise.
    """
    field = reader.fields.get(key)
    if field is None:
        return default
    path = getattr(reader.data, "filename", "the GGUF file")
    try:
        value = field.contents()
    except UnicodeDecodeError:
        raise UserError(f"{path}: metadata {key!r} is not valid UTF-8; the file is damaged: re-download "
                        "or re-convert it") from None
    if kind is not None and not KINDS[kind][0](value):
        raise UserError(f"{path}: metadata {key!r} must be {KINDS[kind][1]}; the file is damaged: "
                        "re-download or re-convert it")
    return value


def required_value(reader: gguf.GGUFReader, key: str, kind: str | None = None):
    """The value of a metadata key the model cannot do without; UserError when it is absent."""
    value = metadata_value(reader, key, kind=kind)
    if value is None:
        raise UserError(f"GGUF file lacks metadata key {key!r}; re-convert it with a current llama.cpp")
    return value


def short_float(value: float) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores 1e-5 as 9.99999974e-06)."""
    return float(str(np.float32(value)))


def hf_name(name: str) -> str:
    """Map a GGUF tensor name to its HF Llama name; UserError for a tensor we do not know."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    match = BLOCK_TENSOR.fullmatch(name)
    if match is None or match.group(2) not in LAYER_NAMES:
        raise UserError(f"GGUF tensor {name!r} is not part of a plain Llama model and is not supported; "
                        "use a GGUF converted from a standard Llama checkpoint")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}"


def read_config(reader: gguf.GGUFReader, tensors: dict[str, np.ndarray]) -> dict:
    """Build an HF LlamaConfig-style dict from the GGUF metadata and the tensors' shapes."""
    hidden = required_value(reader, "llama.embedding_length", "count")
    n_head = required_value(reader, "llama.attention.head_count", "count")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": required_value(reader, "llama.feed_forward_length", "count"),
        "num_hidden_layers": required_value(reader, "llama.block_count", "size"),
        "num_attention_heads": n_head,
        "num_key_value_heads": metadata_value(reader, "llama.attention.head_count_kv", n_head, "count"),
        "head_dim": metadata_value(reader, "llama.attention.key_length", hidden // n_head, "count"),
        "rms_norm_eps": short_float(required_value(reader, "llama.attention.layer_norm_rms_epsilon", "float")),
        "rope_theta": short_float(metadata_value(reader, "llama.rope.freq_base", 10000.0, "float")),
        "max_position_embeddings": required_value(reader, "llama.context_length", "count"),
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": metadata_value(reader, "tokenizer.ggml.bos_token_id", kind="int"),
        "eos_token_id": metadata_value(reader, "tokenizer.ggml.eos_token_id", kind="int"),
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in tensors,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    scaling = metadata_value(reader, "llama.rope.scaling.type", "none", "str")
    if scaling != "none":
        config["rope_scaling"] = {"rope_type": scaling,
                                  "factor": short_float(required_value(reader, "llama.rope.scaling.factor", "float"))}
    return config


def load_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a llama GGUF file; return (HF-style config, {HF name: float32 array [out, in]}).

    Every tensor type the `gguf` package can dequantize is accepted; F32
    tensors stay memory-mapped views, the others are dequantized into RAM.
    Q and K rows come back in HF half-split RoPE order.
    """
    path = Path(path)
    require_regular_file(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on a damaged file; all mean the same to the user
        raise corrupt(path, f"{type(e).__name__}: {e}") from None
    return read_llama(reader, path)


def read_llama(reader: gguf.GGUFReader, path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The config and HF-named float32 tensors of an opened GGUF file (`path` names it in errors)."""
    architecture = metadata_value(reader, "general.architecture", kind="str")
    if architecture != "llama":
        raise UserError(f"{path} has GGUF architecture {architecture!r}; only 'llama' is supported")
    n_head = required_value(reader, "llama.attention.head_count", "count")
    n_head_kv = metadata_value(reader, "llama.attention.head_count_kv", n_head, "count")
    tensors = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UserError(f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which cannot be "
                            "dequantized; re-convert the model with a common type (F16, Q8_0, Q4_K, ...)") from None
        shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists ne0 (the row length) first
        values = values.astype(np.float32, copy=False).reshape(shape)  # [out, in] or [n]
        heads = n_head if ".self_attn.q_proj." in name else n_head_kv if ".self_attn.k_proj." in name else 0
        if heads and (shape[0] % heads or (shape[0] // heads) % 2):
            raise corrupt(path, f"tensor {tensor.name!r} has {shape[0]} rows, which {heads} heads do not split")
        if heads:
            values = interleaved_to_half_split(values, heads)
        tensors[name] = values
    if "model.embed_tokens.weight" not in tensors:
        raise corrupt(path, "it has no token_embd.weight tensor")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    rows = tensors["model.embed_tokens.weight"].shape[0]
    if tokens is not None and len(tokens.data) > rows:
        raise corrupt(path, f"its tokenizer has {len(tokens.data)} tokens, but token_embd.weight only {rows} rows")
    return read_config(reader, tensors), tensors
