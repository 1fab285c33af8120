"""Import AWQ checkpoints (AutoAWQ's GEMM layout) into the `uniform` format.

AWQ (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization") folds its
activation-aware scaling into the weights and stores 4-bit codes with a scale
and zero point per group of input columns, as AutoAWQ's WQLinear_GEMM packs
them (awq/modules/linear/gemm.py `from_linear`; unpacking order in
awq/utils/packing_utils.py):

    <module>.qweight  int32   [in, out/8]          8 codes per word, along the OUTPUT dimension
    <module>.qzeros   int32   [in/G, out/8]        zero points, packed the same way
    <module>.scales   float16 [in/G, out]

    W[o, j] = scales[j // G, o] * (code[j, o] - zero[j // G, o])

Nibble k of word c holds output column 8c + ORDER[k], ORDER = [0, 2, 4, 6,
1, 3, 5, 7] (AWQ's interleaving for its dequantization kernel), lowest nibble
first. Zeros are stored as they are (no minus one). The codes are unpacked
and repacked along the input dimension in the uniform format's order; values
are unchanged.

Supported settings: bits 4, version "gemm", zero_point true, group_size a
multiple of 32 (AutoAWQ writes 128 or 64). GEMV, Marlin and ExLlama layouts,
and llm-compressor's compressed-tensors files, are refused.
"""
from __future__ import annotations

import numpy as np

from runtime.errors import UserError
from runtime.formats.uniform import RUN, UniformTensor
from runtime.checkpoints.importers import packed_modules, require_shape, setting, take_module

BITS = 4
PER_WORD = 32 // BITS
ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # output column (within 8) held by nibble k


def unpack_awq(packed: np.ndarray) -> np.ndarray:
    """int32 [rows, cols/8] in AWQ's order -> codes uint8 [rows, cols]."""
    words = np.ascontiguousarray(packed).view(np.uint32)  # [rows, cols/8]
    codes = np.empty((words.shape[0], words.shape[1], PER_WORD), dtype=np.uint8)  # [rows, cols/8, 8]
    for k in range(PER_WORD):
        codes[:, :, ORDER[k]] = (words >> np.uint32(BITS * k)) & np.uint32(0xF)
    return codes.reshape(words.shape[0], -1)


def read_settings(settings: dict, source: str) -> int:
    """The group size of an AWQ quantization config; UserError for what cannot be imported."""
    setting(settings, "bits", int, (BITS,), None, source)
    setting(settings, "version", str, ("gemm", "GEMM"), "gemm", source)
    setting(settings, "zero_point", bool, (True,), True, source)
    group_size = setting(settings, "group_size", int, None, None, source)
    if group_size <= 0 or group_size % RUN:
        raise UserError(f"{source}: quantization setting group_size={group_size} is not supported "
                        f"(supported: a multiple of {RUN}, e.g. 128 or 64)")
    return group_size


def convert_module(arrays: dict, group_size: int, prefix: str, source: str) -> UniformTensor:
    """One WQLinear_GEMM's arrays -> UniformTensor (W [out, in] with the same values)."""
    qweight = np.asarray(arrays["qweight"])
    if qweight.ndim != 2:
        raise UserError(f"{source}: tensor {prefix + '.qweight'!r} has shape {list(qweight.shape)}, not "
                        f"[in, out/8]; the checkpoint is damaged")
    n_in, n_out = qweight.shape[0], qweight.shape[1] * PER_WORD
    if n_in % group_size:
        raise UserError(f"{source}: {prefix} has {n_in} inputs, not a multiple of group_size {group_size}")
    n_groups = n_in // group_size
    qweight = require_shape(qweight, (n_in, n_out // PER_WORD), np.int32, prefix + ".qweight", source)
    qzeros = require_shape(arrays["qzeros"], (n_groups, n_out // PER_WORD), np.int32, prefix + ".qzeros", source)
    scales = require_shape(arrays["scales"], (n_groups, n_out), np.float16, prefix + ".scales", source)
    codes = unpack_awq(qweight)  # [in, out]
    zeros = unpack_awq(qzeros)  # [n_groups, out]
    sym = bool((zeros == 1 << (BITS - 1)).all())
    return UniformTensor.from_codes(np.ascontiguousarray(codes.T), scales, zeros, bits=BITS,
                                    group_size=group_size, sym=sym)


def convert(config: dict, settings: dict, tensors: dict, source: str) -> dict:
    """{HF name: array or UniformTensor} of an AWQ checkpoint's tensors (every `*.qweight` module packed)."""
    group_size = read_settings(settings, source)
    modules = packed_modules(tensors, "qweight")
    if not modules:
        raise UserError(f"{source}: the config says AWQ but no tensor ends in .qweight; re-download the model")
    out = dict(tensors)
    for prefix in modules:
        arrays = take_module(out, prefix, ("qweight", "qzeros", "scales"), source)
        out[prefix + ".weight"] = convert_module(arrays, group_size, prefix, source)
    return out
