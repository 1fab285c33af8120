"""Export a uniform-format model (RTN or GPTQ tags) as a GPTQ checkpoint transformers loads.

The layout is AutoGPTQ's (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py
`pack`; transformers' GPTQ integration reads it through optimum / GPTQModel):

    config.json       the model config + quantization_config {quant_method: "gptq", bits, group_size,
                      desc_act, sym, checkpoint_format, ...}
    model.safetensors <module>.qweight int32 [in/32*b, out], .qzeros int32 [n_groups, out/32*b],
                      .scales float16 [n_groups, out], .g_idx int32 [in]; the other tensors as stored
    tokenizer files   copied

The codes are the uniform format's, with two changes: qweight is put back in
the original column order (the uniform format stores act-order columns
grouped), and with checkpoint_format "gptq" (AutoGPTQ's v1, the one every
loader reads) qzeros holds zero - 1. A model with a zero point of 0 cannot
be written as v1 (AutoGPTQ's format has no room for -1) and is written as
"gptq_v2" (GPTQModel's, true zeros) instead. The LM head, which this
project keeps at 8 bits whatever the tag, is written dequantized in float16:
a GPTQ config has one bit width for all quantized modules.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from runtime.checkpoints.atomic import atomic_directory, write_text
from runtime.errors import UserError
from runtime.checkpoints.export import copy_tokenizer
from runtime.formats.uniform import PER_ROW, UniformTensor, pack, unpack
from runtime.checkpoints.safetensors_io import write_safetensors

EXPORTABLE = "uniform-format models: rtn or gptq tags, 2/3/4/8 bits, any group, sym or not, act-order"


def gptq_arrays(packed: UniformTensor, v1: bool) -> dict:
    """{part: array} of one projection in AutoGPTQ's layout (columns in original order, v1 zeros - 1)."""
    n_in, n_out, bits = packed.in_features, packed.out_features, packed.bits
    stored = unpack(np.asarray(packed.qweight), bits, n_in)  # [in, out], storage order
    codes = np.empty_like(stored)  # [in, out], original column order
    codes[np.asarray(packed.perm) if packed.perm is not None else np.arange(n_in)] = stored
    zeros = unpack(np.ascontiguousarray(np.asarray(packed.qzeros).T), bits, n_out).T.astype(np.int64)  # [groups, out]
    return {"qweight": pack(codes, bits),
            "qzeros": np.ascontiguousarray(pack(np.ascontiguousarray((zeros - v1).T), bits).T),
            "scales": np.asarray(packed.scales), "g_idx": np.asarray(packed.g_idx)}


def export(model_dir: Path, config: dict, tensors: dict, out: Path) -> None:
    """Write the model `config` / `tensors` (loaded from `model_dir`) as a GPTQ checkpoint directory `out`."""
    heads = {name for name in tensors if name.startswith("lm_head.")}
    projections = {name: t for name, t in tensors.items() if name not in heads and not hasattr(t, "ndim")}
    foreign = sorted({type(t).__name__ for t in projections.values() if not isinstance(t, UniformTensor)})
    if foreign:
        raise UserError(f"{model_dir}: its weights are {', '.join(foreign)}, which GPTQ cannot hold; exportable "
                        f"are {EXPORTABLE}")
    settings = {(t.bits, t.group_size) for t in projections.values()}
    if len(settings) != 1:
        raise UserError(f"{model_dir}: its projections mix bit widths or groups {sorted(settings)}; a GPTQ "
                        f"checkpoint has one")
    bits, group_size = settings.pop()
    zeros_min = min(int(unpack(np.ascontiguousarray(np.asarray(t.qzeros).T), bits, t.out_features).min())
                    for t in projections.values())
    v1 = zeros_min >= 1
    if not v1:
        print(f"note: {model_dir} has zero points of 0, which AutoGPTQ's v1 layout cannot store; writing "
              f"checkpoint_format gptq_v2 (GPTQModel)", file=sys.stderr)
    arrays = {}
    for name, value in tensors.items():
        if name in projections:
            prefix = name[:-len(".weight")]
            arrays.update({f"{prefix}.{part}": a for part, a in gptq_arrays(value, v1).items()})
        elif hasattr(value, "ndim"):
            arrays[name] = np.asarray(value)
        else:
            arrays[name] = np.asarray(value.dequantize(), dtype=np.float16)  # the 8-bit LM head
    hf_config = {k: v for k, v in config.items() if k != "quantization"}
    hf_config.update(torch_dtype="float16", tie_word_embeddings="lm_head.weight" not in arrays)
    hf_config["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size if group_size != PER_ROW else -1,
        "desc_act": any(t.act_order for t in projections.values()),
        "sym": all(t.sym for t in projections.values()), "true_sequential": True, "static_groups": False,
        "damp_percent": 0.01, "lm_head": False, "checkpoint_format": "gptq" if v1 else "gptq_v2",
        "pack_dtype": "int32"}
    with atomic_directory(out) as tmp:
        write_safetensors(Path(tmp) / "model.safetensors", arrays, {"format": "pt"})
        write_text(Path(tmp) / "config.json", json.dumps(hf_config, indent=2) + "\n")
        copy_tokenizer(model_dir, tmp)
