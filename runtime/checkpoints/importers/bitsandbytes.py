"""Import bitsandbytes checkpoints saved by transformers into the `lut4` and `int8` formats.

4-bit (QLoRA's NF4 and FP4, Dettmers et al. 2023; bitsandbytes'
Params4bit and QuantState.as_dict(packed=True) in bitsandbytes/functional.py,
written by transformers' save_pretrained) stores per linear:

    <m>.weight             uint8   [ceil(out*in/2), 1]  codes of W flattened row-major, FIRST in the HIGH nibble
    <m>.weight.absmax      float32 [n_blocks]           absmax of each block of `blocksize` weights
                           uint8   [n_blocks]           ... or its 8-bit code with double quantization
    <m>.weight.quant_map   float32 [16]                 code -> value (the NF4 or FP4 table)
    <m>.weight.nested_absmax     float32 [ceil(n_blocks/256)]  (double quantization)
    <m>.weight.nested_quant_map  float32 [256]                 the signed dynamic map
    <m>.weight.quant_state.bitsandbytes__nf4 (or __fp4)  uint8  the JSON {quant_type, blocksize, dtype, shape,
                                                          nested_blocksize, nested_dtype, nested_offset}

    absmax[b] = nested_quant_map[absmax_q[b]] * nested_absmax[b // 256] + nested_offset
    W.flat[i] = quant_map[code[i]] * absmax[i // blocksize]

which is the lut4 format (runtime/formats/lut4.py) when every row holds whole
blocks: the codes, table and absmax are taken over unchanged; double
quantization stays double-quantized when the file's nested map is the lut4
format's dynamic map, else its absmax is decoded in float32 as bitsandbytes
does.

8-bit (LLM.int8(), Dettmers et al. 2022; bitsandbytes' Int8Params):

    <m>.weight  int8    [out, in]
    <m>.SCB     float32 [out]      max |W[o, :]| of each row

    W[o, i] = weight[o, i] * SCB[o] / 127

-> the int8 format with row scales SCB / 127, per-token activations and the
outlier threshold `llm_int8_threshold` of the config (bitsandbytes' default
6.0). Modules the config skipped stay float.
"""
from __future__ import annotations

import json

import numpy as np

from runtime.errors import UserError
from runtime.formats.int8 import Int8Tensor
from runtime.formats.lut4 import DQ_BLOCK_SIZE, Lut4Tensor, dynamic_map
from runtime.checkpoints.importers import packed_modules, require_shape, setting, take_module

QUANT_TYPES = ("nf4", "fp4")
STATE = "quant_state.bitsandbytes__"


def quant_state(tensors: dict, prefix: str, source: str) -> tuple[str, dict]:
    """(quant_type, the JSON quant state) of the 4-bit module `prefix`, its state tensor removed."""
    for quant_type in QUANT_TYPES:
        name = f"{prefix}.weight.{STATE}{quant_type}"
        if name in tensors:
            raw = np.asarray(tensors.pop(name))
            try:
                state = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                state = None
            if not isinstance(state, dict):
                raise UserError(f"{source}: tensor {name!r} does not hold a JSON quant state; the checkpoint "
                                f"is damaged")
            return quant_type, state
    raise UserError(f"{source}: {prefix} has no quant state tensor; re-download the model")


def state_value(state: dict, key: str, test, says: str, prefix: str, source: str):
    """state[key] when `test` accepts it; UserError naming the module and key otherwise."""
    value = state.get(key)
    if not test(value):
        raise UserError(f"{source}: the quant state of {prefix} has {key}={value!r}, not {says}; "
                        f"the checkpoint is damaged")
    return value


def is_count(value) -> bool:
    """True for a positive int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def convert_4bit(tensors: dict, prefix: str, source: str) -> Lut4Tensor:
    """One Linear4bit's arrays (removed from `tensors`) -> Lut4Tensor with the same values."""
    quant_type, state = quant_state(tensors, prefix, source)
    shape = state_value(state, "shape", lambda v: isinstance(v, list) and len(v) == 2 and all(map(is_count, v)),
                        "[out, in]", prefix, source)
    block = state_value(state, "blocksize", is_count, "a positive integer", prefix, source)
    n_out, n_in = shape
    if n_in % block or block % 8:
        raise UserError(f"{source}: {prefix} has blocks of {block} weights across rows of {n_in}; only blocks that "
                        f"are a multiple of 8 and divide a row can be imported")
    nested = "nested_offset" in state
    parts = ("weight", "weight.absmax", "weight.quant_map") + (
        ("weight.nested_absmax", "weight.nested_quant_map") if nested else ())
    arrays = take_module(tensors, prefix, parts, source)
    n_blocks = n_out * n_in // block
    weight = require_shape(arrays["weight"], (n_out * n_in // 2, 1), np.uint8, prefix + ".weight", source)
    table = require_shape(arrays["weight.quant_map"], (16,), np.float32, prefix + ".weight.quant_map", source)
    qweight = weight.reshape(n_out, n_in // 2)  # [out, in/2], high nibble first as in lut4
    if not nested:
        absmax = require_shape(arrays["weight.absmax"], (n_blocks,), np.float32, prefix + ".weight.absmax", source)
        return Lut4Tensor(qweight, table, block, absmax=absmax.reshape(n_out, n_in // block))
    nested_block = state_value(state, "nested_blocksize", is_count, "a positive integer", prefix, source)
    offset = state_value(state, "nested_offset", lambda v: isinstance(v, (int, float)) and np.isfinite(v),
                         "a finite number", prefix, source)
    absmax_q = require_shape(arrays["weight.absmax"], (n_blocks,), np.uint8, prefix + ".weight.absmax", source)
    n_runs = -(-n_blocks // nested_block)
    scale = require_shape(arrays["weight.nested_absmax"], (n_runs,), np.float32, prefix + ".weight.nested_absmax",
                          source)
    code = require_shape(arrays["weight.nested_quant_map"], (256,), np.float32, prefix + ".weight.nested_quant_map",
                         source)
    mean = np.array([offset], dtype=np.float32)  # [1]
    if nested_block == DQ_BLOCK_SIZE and np.array_equal(code, dynamic_map()):
        return Lut4Tensor(qweight, table, block, absmax_q=absmax_q.reshape(n_out, -1), absmax_scale=scale,
                          absmax_mean=mean)
    absmax = code[absmax_q] * scale[np.arange(n_blocks) // nested_block] + mean[0]  # [n_blocks] float32
    return Lut4Tensor(qweight, table, block, absmax=absmax.reshape(n_out, n_in // block))


def convert_8bit(tensors: dict, prefix: str, threshold: float, source: str) -> Int8Tensor:
    """One Linear8bitLt's arrays (removed from `tensors`) -> Int8Tensor with the same values."""
    arrays = take_module(tensors, prefix, ("weight", "SCB"), source, optional=("weight_format",))
    weight = np.asarray(arrays["weight"])
    if weight.ndim != 2:
        raise UserError(f"{source}: tensor {prefix + '.weight'!r} has shape {list(weight.shape)}, not [out, in]")
    weight = require_shape(weight, weight.shape, np.int8, prefix + ".weight", source)
    scb = require_shape(arrays["SCB"], (weight.shape[0],), np.float32, prefix + ".SCB", source)
    if "weight_format" in arrays and int(np.asarray(arrays["weight_format"]).reshape(-1)[0]) != 0:
        raise UserError(f"{source}: {prefix}.weight_format is not 0 (row-major); only row-major int8 weights "
                        f"can be imported")
    scales = (scb * np.float32(1 / 127)).astype(np.float32)  # [out]
    return Int8Tensor(weight, scales, "row", "token", threshold)


def convert(config: dict, settings: dict, tensors: dict, source: str) -> dict:
    """{HF name: array or packed tensor} of a bitsandbytes checkpoint's tensors."""
    four = setting(settings, "load_in_4bit", bool, None, False, source)
    eight = setting(settings, "load_in_8bit", bool, None, False, source)
    if four == eight:
        raise UserError(f"{source}: quantization_config must set exactly one of load_in_4bit and load_in_8bit")
    out = dict(tensors)
    if four:
        setting(settings, "bnb_4bit_quant_storage", str, ("uint8",), "uint8", source)
        modules = sorted({name.split(".weight." + STATE)[0] for name in out if ".weight." + STATE in name})
        for prefix in modules:
            out[prefix + ".weight"] = convert_4bit(out, prefix, source)
    else:
        threshold = setting(settings, "llm_int8_threshold", (int, float), None, 6.0, source)
        if setting(settings, "llm_int8_has_fp16_weight", bool, None, False, source):
            raise UserError(f"{source}: llm_int8_has_fp16_weight=true keeps float weights; load it as a float model")
        modules = packed_modules(out, "SCB")
        for prefix in modules:
            out[prefix + ".weight"] = convert_8bit(out, prefix, float(threshold), source)
    if not modules:
        raise UserError(f"{source}: the config says bitsandbytes but no quantized weights were found; "
                        f"re-download the model")
    return out
