"""Numba helpers the CPU kernels share: reinterpreting bits as floats, and reading a stored scale.

Numba has no float16 type and no bit casts, so these are LLVM intrinsics:
`half_to_float` converts an IEEE half given as its 16 bits (LLVM `fpext`,
the CPU's half-precision instruction where it has one: `vcvtph2ps` on x86,
which also vectorizes), `float_from_bits` reinterprets an int32 as float32.
`scale_value` reads one stored scale, float16 bits (uint16) or float32, as
the formats store them.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


@intrinsic
def half_to_float(typingctx, bits):
    """float32 value of the IEEE half-precision number whose bits are `bits` (uint16)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def float_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 `bits`."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


def scale_value(value):
    """float32 of one stored scale: float16 bits (uint16) or float32; compiled through the overload below."""
    raise NotImplementedError("called from compiled code only")


@overload(scale_value, inline="always")
def _scale_value(value):
    if value == types.uint16:
        return lambda value: half_to_float(value)
    return lambda value: np.float32(value)
