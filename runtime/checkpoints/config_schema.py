"""What a model's config.json must say, and which tensors (names, shapes, dtypes) it implies.

Model files come from anywhere, so every field the runtime reads is checked
once, against a small declarative schema per architecture (llama, opt):
its type, its range, and the relations between fields (heads divide the
hidden size, kv heads divide heads, token ids lie in the vocabulary). From
the checked values `expected_tensors` derives every tensor name and shape a
checkpoint of that config holds, and `check_tensors` compares a loaded
checkpoint against them before any forward pass runs. Every failure is a
one-line `UserError` naming the file and the field or tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.errors import UserError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "OPTForCausalLM": "opt"}
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "opt": "opt"}
REQUIRED = object()  # the default of a field that has none


@dataclass(frozen=True)
class Rule:
    """A field's type and range: `test(value)` is True for an allowed value, `says` describes them."""
    says: str
    test: object


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


POSITIVE_INT = Rule("a positive integer", lambda v: is_int(v) and v > 0)
LAYER_COUNT = Rule("an integer >= 0", lambda v: is_int(v) and v >= 0)
POSITIVE_FLOAT = Rule("a positive finite number",
                      lambda v: (is_int(v) or isinstance(v, float)) and math.isfinite(v) and v > 0)
BOOL = Rule("true or false", lambda v: isinstance(v, bool))
TOKEN_ID = Rule("a token id (an integer >= 0) or null", lambda v: is_int(v) and v >= 0)
TOKEN_IDS = Rule("a token id or a list of token ids",
                 lambda v: (is_int(v) and v >= 0) or (isinstance(v, list) and len(v) > 0
                                                      and all(is_int(i) and i >= 0 for i in v)))

# (HF key, rule, {architecture that reads it: its default}). A null value counts as absent.
FIELDS = (
    ("vocab_size", POSITIVE_INT, {"llama": REQUIRED, "opt": REQUIRED}),
    ("hidden_size", POSITIVE_INT, {"llama": REQUIRED, "opt": REQUIRED}),
    ("num_hidden_layers", LAYER_COUNT, {"llama": REQUIRED, "opt": REQUIRED}),
    ("num_attention_heads", POSITIVE_INT, {"llama": REQUIRED, "opt": REQUIRED}),
    ("num_key_value_heads", POSITIVE_INT, {"llama": None}),
    ("intermediate_size", POSITIVE_INT, {"llama": REQUIRED}),
    ("ffn_dim", POSITIVE_INT, {"opt": REQUIRED}),
    ("max_position_embeddings", POSITIVE_INT, {"llama": 2048, "opt": 2048}),
    ("head_dim", POSITIVE_INT, {"llama": None}),
    ("rms_norm_eps", POSITIVE_FLOAT, {"llama": 1e-6}),
    ("rope_theta", POSITIVE_FLOAT, {"llama": 10000.0}),
    ("word_embed_proj_dim", POSITIVE_INT, {"opt": None}),
    ("do_layer_norm_before", BOOL, {"opt": True}),
    ("enable_bias", BOOL, {"opt": True}),
    ("tie_word_embeddings", BOOL, {"llama": True, "opt": True}),
    ("attention_bias", BOOL, {"llama": False}),
    ("bos_token_id", TOKEN_ID, {"llama": None, "opt": None}),
    ("eos_token_id", TOKEN_IDS, {"llama": None, "opt": None}),
)
# Per architecture: HF key -> (rule, default), in the order of FIELDS.
SCHEMAS = {arch: {key: (rule, defaults[arch]) for key, rule, defaults in FIELDS if arch in defaults}
           for arch in ("llama", "opt")}


def shown(value) -> str:
    """A short, one-line repr of a config value for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def bad_field(source: str, key: str, problem: str) -> UserError:
    return UserError(f"{source}: field {key!r} {problem}; fix the file or re-download the model")


def architecture(hf: dict, source: str) -> str:
    """"llama" or "opt" from `architectures` or `model_type`; UserError for anything else."""
    names = hf.get("architectures")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise bad_field(source, "architectures", f"is {shown(names)}, but it must be a list of class names")
    arch = ARCHITECTURES.get(names[0]) if names else MODEL_TYPES.get(hf.get("model_type"))
    if arch is None:
        raise UserError(f"{source}: unsupported architecture {shown(names or hf.get('model_type'))}; "
                        f"supported are {', '.join(ARCHITECTURES)}")
    return arch


def check_config(hf: dict, source: str = "config.json") -> tuple[str, dict]:
    """(arch, {key: checked value, defaults filled}) of an HF config dict; UserError naming the field."""
    if not isinstance(hf, dict):
        raise UserError(f"{source} does not hold a JSON object; fix the file or re-download the model")
    arch = architecture(hf, source)
    rope = hf.get("rope_parameters")
    if hf.get("rope_theta") is None and isinstance(rope, dict):  # transformers 5 nests it here
        hf = dict(hf, rope_theta=rope.get("rope_theta"))
    values = {}
    for key, (rule, default) in SCHEMAS[arch].items():
        value = hf.get(key)
        if value is None and default is REQUIRED:
            raise bad_field(source, key, "is missing, but the model needs it")
        if value is not None and not rule.test(value):
            raise bad_field(source, key, f"is {shown(value)}, but it must be {rule.says}")
        values[key] = default if value is None else value
    check_relations(arch, hf, values, source)
    return arch, values


def check_relations(arch: str, hf: dict, v: dict, source: str) -> None:
    """The rules that tie fields together: divisibility, token ids in the vocabulary, supported options."""
    hidden, heads = v["hidden_size"], v["num_attention_heads"]
    if hidden % heads:
        raise bad_field(source, "num_attention_heads", f"is {heads}, which does not divide hidden_size {hidden}")
    for key in ("bos_token_id", "eos_token_id"):
        ids = v[key] if isinstance(v[key], list) else [v[key]]
        if any(i is not None and i >= v["vocab_size"] for i in ids):
            raise bad_field(source, key, f"is {shown(v[key])}, outside the vocabulary of {v['vocab_size']}")
    if arch == "opt":
        if hf.get("activation_function", "relu") != "relu":
            raise bad_field(source, "activation_function", f"is {shown(hf['activation_function'])}; "
                                                            "only relu OPT models are supported")
        if not v["enable_bias"]:
            raise bad_field(source, "enable_bias", "is false; only OPT models with biases are supported")
        return
    kv = v["num_key_value_heads"] or heads
    if heads % kv:
        raise bad_field(source, "num_key_value_heads", f"is {kv}, which does not divide num_attention_heads {heads}")
    if (hidden // heads) % 2:
        raise bad_field(source, "num_attention_heads", f"is {heads}: the head size {hidden // heads} must be "
                                                        "even for rotary embeddings")
    if v["head_dim"] not in (None, hidden // heads):
        raise bad_field(source, "head_dim", f"is {v['head_dim']}; only hidden_size / num_attention_heads "
                                            f"({hidden // heads}) is supported")
    if hf.get("rope_scaling"):
        raise bad_field(source, "rope_scaling", f"is {shown(hf['rope_scaling'])}; rope scaling is not supported")


def expected_tensors(arch: str, v: dict) -> tuple[dict, dict]:
    """({name: shape} a checkpoint must hold, {name: shape} it may hold) for checked config values `v`."""
    return llama_tensors(v) if arch == "llama" else opt_tensors(v)


def llama_tensors(v: dict) -> tuple[dict, dict]:
    h, vocab, ffn = v["hidden_size"], v["vocab_size"], v["intermediate_size"]
    hd = h // v["num_attention_heads"]
    q, kv = v["num_attention_heads"] * hd, (v["num_key_value_heads"] or v["num_attention_heads"]) * hd
    required = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    optional = {}
    (optional if v["tie_word_embeddings"] else required)["lm_head.weight"] = (vocab, h)
    for i in range(v["num_hidden_layers"]):
        p = f"model.layers.{i}."
        required.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                         p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                         p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                         p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                         p + "mlp.down_proj.weight": (h, ffn)})
        optional[p + "self_attn.rotary_emb.inv_freq"] = (hd // 2,)  # a buffer older checkpoints saved
        if v["attention_bias"]:
            optional.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                             p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (h,)})
    return required, optional


def opt_tensors(v: dict) -> tuple[dict, dict]:
    h, vocab, ffn = v["hidden_size"], v["vocab_size"], v["ffn_dim"]
    e = v["word_embed_proj_dim"] or h
    d = "model.decoder."
    required = {d + "embed_tokens.weight": (vocab, e), d + "embed_positions.weight": (v["max_position_embeddings"] + 2, h)}
    optional = {d + "final_layer_norm.weight": (h,), d + "final_layer_norm.bias": (h,)}
    (optional if v["tie_word_embeddings"] else required)["lm_head.weight"] = (vocab, e)
    if e != h:
        required.update({d + "project_in.weight": (h, e), d + "project_out.weight": (e, h)})
    for i in range(v["num_hidden_layers"]):
        p = f"{d}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            required.update({f"{p}self_attn.{proj}.weight": (h, h), f"{p}self_attn.{proj}.bias": (h,)})
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            required.update({f"{p}{norm}.weight": (h,), f"{p}{norm}.bias": (h,)})
        required.update({p + "fc1.weight": (ffn, h), p + "fc1.bias": (ffn,),
                         p + "fc2.weight": (h, ffn), p + "fc2.bias": (h,)})
    return required, optional


def layer_of(name: str) -> int | None:
    """The layer index in a tensor name like model.layers.3.mlp..., or None."""
    _, found, rest = name.partition(".layers.")
    index = rest.partition(".")[0]
    return int(index) if found and index.isdigit() else None


def check_tensors(hf: dict, tensors: dict, source: str, config_source: str = "config.json") -> None:
    """UserError unless `tensors` hold exactly the names, shapes and float dtypes that `hf` implies.

    Packed tensors (anything without `ndim`) are checked by their `shape` alone;
    their formats check their own arrays.
    """
    arch, values = check_config(hf, config_source)
    layers = values["num_hidden_layers"]
    stored = {layer_of(n) for n in tensors} - {None}
    if layers != len(stored) or stored and max(stored) >= layers:  # before listing `layers` layers' names
        raise UserError(f"{config_source} says num_hidden_layers is {layers}, but {source} holds tensors of "
                        f"{len(stored)} layers; fix num_hidden_layers or re-download the model")
    required, optional = expected_tensors(arch, values)
    for name in required:
        if name not in tensors:
            raise UserError(f"{source} lacks tensor {name!r}, which {config_source} implies; the file is "
                            "incomplete or renamed: re-download or rebuild the model")
    for name, value in tensors.items():
        shape = required.get(name, optional.get(name))
        if shape is None:
            raise UserError(f"{source} holds tensor {name!r}, which {config_source} does not describe; "
                            "re-download or rebuild the model")
        if tuple(value.shape) != shape:
            raise UserError(f"{source}: tensor {name!r} has shape {tuple(value.shape)}, but {config_source} "
                            f"implies {shape}; the file does not match its config: re-download or rebuild it")
        if hasattr(value, "ndim") and not np.issubdtype(value.dtype, np.floating):
            raise UserError(f"{source}: tensor {name!r} is {value.dtype}, but a float weight belongs there; "
                            "re-download or rebuild the model")
