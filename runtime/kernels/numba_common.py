"""Numba helpers the CPU kernels share: reinterpreting bits as floats, reading a stored scale, e^x, and one
intrinsic over several kernel variants.

Numba has no float16 type and no bit casts, so these are LLVM intrinsics:
`half_to_float` converts an IEEE half given as its 16 bits (LLVM `fpext`,
the CPU's half-precision instruction where it has one: `vcvtph2ps` on x86,
which also vectorizes), `float_from_bits` reinterprets an int32 as float32.
`scale_value` reads one stored scale, float16 bits (uint16) or float32, as
the formats store them.

`exp32` is e^x in float32 that LLVM vectorizes (Numba's np.exp and np.tanh
call the C library once per value when Intel's SVML is not installed, which
cost 3-4x a whole softmax or SiLU loop): Cody and Waite's range reduction
x = n ln2 + r with ln2 split in two (0.693359375 - 2.12194440e-4), the
degree-7 minimax polynomial of e^r on |r| <= ln2/2 from Cephes' expf
(Moshier 1984), and 2^n built from its exponent bits. Relative error at most
3e-7 (2-3 ulp) on [-80, 80]; inputs are clamped to [-87, 88], so it never
overflows.

`variant_switch` makes one intrinsic of several code generators with the
same arguments (e.g. a tile kernel per code width): its first argument, a
variant number, picks one at run time through an LLVM `switch`, so a caller
names one function instead of a chain of `if bits == ...` branches.
"""
from __future__ import annotations

import inspect

import numpy as np
from llvmlite import ir
from numba import njit, types
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


@njit(inline="always", fastmath=True)
def exp32(x):
    """e^x for float32 x (module docstring: Cephes' expf, vectorizable)."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))  # round(x / ln2)
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)  # |r| <= ln2 / 2
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return (p * r * r + r + np.float32(1.0)) * float_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


def scale_value(value):
    """float32 of one stored scale: float16 bits (uint16) or float32; compiled through the overload below."""
    raise NotImplementedError("called from compiled code only")


@overload(scale_value, inline="always")
def _scale_value(value):
    if value == types.uint16:
        return lambda value: half_to_float(value)
    return lambda value: np.float32(value)


def variant_switch(typer, codegens):
    """An intrinsic f(variant, *args) running codegens[variant - 1](context, builder, signature, args) for variant
    1 .. len(codegens) and nothing for any other; typer(typingctx, *args) gives the variants' shared (void)
    signature, as an intrinsic's typer does."""
    def switch_typer(typingctx, variant, *arg_types):
        signature = typer(typingctx, *arg_types)[0]

        def codegen(context, builder, full_signature, args):
            done = builder.append_basic_block("variant_done")
            switch = builder.switch(args[0], done)
            for number, variant_codegen in enumerate(codegens, start=1):
                block = builder.append_basic_block(f"variant_{number}")
                switch.add_case(ir.Constant(args[0].type, number), block)
                builder.position_at_end(block)
                variant_codegen(context, builder, signature, args[1:])
                builder.branch(done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return types.void(types.int64, *signature.args), codegen

    context, *arguments = inspect.signature(typer).parameters.values()  # named: Numba reads the typer's
    variant = inspect.Parameter("variant", inspect.Parameter.POSITIONAL_OR_KEYWORD)  # parameters (no *args)
    switch_typer.__signature__ = inspect.Signature([context, variant, *arguments])
    return intrinsic(switch_typer)
