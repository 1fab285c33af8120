"""Import GPTQ checkpoints (AutoGPTQ, GPTQModel, optimum, transformers) into the `uniform` format.

GPTQ (Frantar et al. 2022) checkpoints store every quantized linear as four
arrays, the layout runtime/formats/uniform.py was modelled on (AutoGPTQ's
QuantLinear, auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py `pack`):

    <module>.qweight  int32   [in/32 * b, out]        codes along the input dimension, low bits first
    <module>.qzeros   int32   [n_groups, out/32 * b]  zero points along the output dimension
    <module>.scales   float16 [n_groups, out]
    <module>.g_idx    int32   [in]                    group of each input column (act-order: permuted)

    W[o, j] = scales[g_idx[j], o] * (code[j, o] - zero[g_idx[j], o])

The bit order of b = 2, 3, 4, 8 is the uniform format's (3 bits straddle
words as AutoGPTQ packs them). Two things differ and are converted here:

- checkpoint_format "gptq" (v1, AutoGPTQ) stores zero - 1 in qzeros;
  "gptq_v2" (GPTQModel) stores the zero itself, as the uniform format does.
  A v1 zero of 0 cannot be stored (it wraps to 2**b - 1 and corrupts its
  neighbours) and is refused.
- With act-order (desc_act) qweight keeps the original column order; the
  uniform format stores columns grouped (storage order), so the unpacked
  codes are repacked by `from_codes`.

Settings read from the quantization config: bits, group_size (-1 = one group
per row), checkpoint_format (or GPTQModel's `format`), pack_dtype (int32
only). desc_act and sym need no handling (g_idx and the zeros carry them);
true_sequential, static_groups, damp_percent and the rest describe how the
codes were chosen and are ignored. Any module holding a qweight is converted,
the LM head included when the checkpoint quantized it.
"""
from __future__ import annotations

import numpy as np

from runtime.errors import UserError
from runtime.formats.uniform import PER_ROW, RUN, UniformTensor, unpack
from runtime.checkpoints.importers import packed_modules, require_shape, setting, take_module

FORMATS = ("gptq", "gptq_v2")


def read_settings(settings: dict, source: str) -> tuple[int, int, bool]:
    """(bits, group_size, v1) from a GPTQ quantization config; UserError for what cannot be imported."""
    bits = setting(settings, "bits", int, (2, 3, 4, 8), None, source)
    group_size = setting(settings, "group_size", int, None, PER_ROW, source)
    if group_size != PER_ROW and (group_size <= 0 or group_size % RUN):
        raise UserError(f"{source}: quantization setting group_size={group_size} is not supported "
                        f"(supported: -1 or a multiple of {RUN})")
    fmt = settings.get("checkpoint_format", settings.get("format"))
    fmt = setting({"checkpoint_format": fmt}, "checkpoint_format", str, FORMATS, "gptq", source)
    setting(settings, "pack_dtype", str, ("int32",), "int32", source)
    return bits, group_size, fmt == "gptq"


def convert_module(arrays: dict, bits: int, group_size: int, v1: bool, prefix: str, source: str) -> UniformTensor:
    """One GPTQ QuantLinear's arrays -> UniformTensor (W [out, in] with the same values)."""
    scales = np.asarray(arrays["scales"])
    if scales.ndim != 2:
        raise UserError(f"{source}: tensor {prefix + '.scales'!r} has shape {list(scales.shape)}, not "
                        f"[n_groups, out]; the checkpoint is damaged")
    n_out = scales.shape[1]
    qweight = np.asarray(arrays["qweight"])
    n_in = arrays["g_idx"].shape[0] if "g_idx" in arrays else qweight.shape[0] * RUN // bits
    n_groups = 1 if group_size == PER_ROW else -(-n_in // group_size)
    qweight = require_shape(qweight, (-(-n_in // RUN) * bits, n_out), np.int32, prefix + ".qweight", source)
    qzeros = require_shape(arrays["qzeros"], (n_groups, -(-n_out // RUN) * bits), np.int32, prefix + ".qzeros",
                           source)
    scales = require_shape(scales, (n_groups, n_out), np.float16, prefix + ".scales", source)
    g_idx = None
    if "g_idx" in arrays:
        g_idx = require_shape(arrays["g_idx"], (n_in,), np.int32, prefix + ".g_idx", source)
        if g_idx.min(initial=0) < 0 or g_idx.max(initial=0) >= n_groups:
            raise UserError(f"{source}: tensor {prefix + '.g_idx'!r} names groups outside 0..{n_groups - 1}; "
                            f"the checkpoint is damaged")
    codes = unpack(qweight, bits, n_in)  # [in, out], original column order
    zeros = unpack(np.ascontiguousarray(qzeros.T), bits, n_out).T.astype(np.int64)  # [n_groups, out]
    if v1:
        zeros = zeros + 1
        if zeros.max() >= 1 << bits:
            raise UserError(f"{source}: {prefix}.qzeros holds a v1 zero point of 0 (stored as -1), which "
                            f"AutoGPTQ's format cannot represent; re-export the model as gptq_v2")
    sym = bool((zeros == 1 << (bits - 1)).all())
    return UniformTensor.from_codes(np.ascontiguousarray(codes.T), scales, zeros, bits=bits,
                                    group_size=group_size, sym=sym, g_idx=g_idx)


def convert(config: dict, settings: dict, tensors: dict, source: str) -> dict:
    """{HF name: array or UniformTensor} of a GPTQ checkpoint's tensors (every `*.qweight` module packed)."""
    bits, group_size, v1 = read_settings(settings, source)
    modules = packed_modules(tensors, "qweight")
    if not modules:
        raise UserError(f"{source}: the config says GPTQ but no tensor ends in .qweight; re-download the model")
    out = dict(tensors)
    for prefix in modules:
        arrays = take_module(out, prefix, ("qweight", "qzeros", "scales"), source, optional=("g_idx",))
        out[prefix + ".weight"] = convert_module(arrays, bits, group_size, v1, prefix, source)
    return out
