"""Numba helpers the CPU kernels share: reinterpreting bits as floats, reading a stored scale, e^x, small
matrix products by register blocks, one intrinsic over several kernel variants, and calling compiled code
without typing its arguments again (`DirectCalls`).

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

`combine_rows` is out = C · src for a small C (a Hadamard or Kronecker
factor, at most a few dozen rows) on rows whose width is a multiple of 16:
COMBINE_ROWS output rows of 16 floats per pass over the terms, each an
accumulator register fed by one load of src (Numba's own loops over a
runtime width of 16-96 ran their loop overhead per 16 floats: 3.7 of the
5.8 us of SmolLM2's 576-point Hadamard transform).

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
from numba.core import cgutils
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


COMBINE_ROWS = 4  # output rows per pass of `combine_rows`
COMBINE_WIDTH = 16  # floats per block of a row (one AVX-512 register)


@njit(inline="always")
def combines(rows, width):
    """Whether `combine_rows` takes outputs of `rows` rows of `width` floats."""
    return rows % COMBINE_ROWS == 0 and width % COMBINE_WIDTH == 0


@intrinsic
def combine_rows(typingctx, coef, src, out, transpose):
    """out[i, :] = Σ_k C[i, k] · src[k, :] for k < src rows, C = coef or (with `transpose`) coefᵀ: coef, src [k,
    w] and out [r, w] float32 C-contiguous, `combines(r, w)`; coef has at least k columns (rows transposed)."""
    def codegen(context, builder, signature, args):
        f32, i32 = ir.FloatType(), ir.IntType(32)
        floats = ir.VectorType(f32, COMBINE_WIDTH)
        c_array, s_array, o_array = (context.make_array(signature.args[i])(context, builder, args[i]) for i in range(3))
        c_cols = cgutils.unpack_tuple(builder, c_array.shape)[1]
        terms, width = cgutils.unpack_tuple(builder, s_array.shape)
        rows = cgutils.unpack_tuple(builder, o_array.shape)[0]
        transpose = args[3]
        accs = [cgutils.alloca_once_value(builder, ir.Constant(floats, None)) for _ in range(COMBINE_ROWS)]
        splat_mask = ir.Constant(ir.VectorType(i32, COMBINE_WIDTH), [0] * COMBINE_WIDTH)
        with cgutils.for_range(builder, builder.udiv(rows, ir.Constant(rows.type, COMBINE_ROWS))) as i_loop:
            i0 = builder.mul(i_loop.index, ir.Constant(rows.type, COMBINE_ROWS))
            with cgutils.for_range(builder, builder.udiv(width, ir.Constant(width.type, COMBINE_WIDTH))) as w_loop:
                column = builder.mul(w_loop.index, ir.Constant(width.type, COMBINE_WIDTH))
                for acc in accs:
                    builder.store(ir.Constant(floats, None), acc)
                with cgutils.for_range(builder, terms) as k_loop:
                    k = k_loop.index
                    source = builder.gep(s_array.data, [builder.add(builder.mul(k, width), column)])
                    v = builder.load(builder.bitcast(source, floats.as_pointer()), align=4)
                    for t, acc in enumerate(accs):
                        i = builder.add(i0, ir.Constant(rows.type, t))
                        index = builder.select(transpose, builder.add(builder.mul(k, c_cols), i),
                                               builder.add(builder.mul(i, c_cols), k))
                        coef = builder.load(builder.gep(c_array.data, [index]))
                        splat = builder.shuffle_vector(builder.insert_element(ir.Constant(floats, ir.Undefined), coef,
                                                                              ir.Constant(i32, 0)),
                                                       ir.Constant(floats, ir.Undefined), splat_mask)
                        builder.store(builder.fadd(builder.load(acc), builder.fmul(splat, v, flags=("contract",)),
                                                   flags=("contract",)), acc)
                for t, acc in enumerate(accs):
                    i = builder.add(i0, ir.Constant(rows.type, t))
                    target = builder.gep(o_array.data, [builder.add(builder.mul(i, width), column)])
                    builder.store(builder.load(acc), builder.bitcast(target, floats.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(coef, src, out, types.boolean), codegen


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


class DirectCalls:
    """Numba functions called through their compiled code for the argument types met before, without the
    dispatcher typing every argument on every call (for the decode step's twenty typed lists that typing took
    ~100-250 us a call, 2-5% of a SmolLM2 token). For callers whose arguments other than arrays keep their types
    from call to call (the same typed lists, ints, floats); arrays are told apart by dtype, dimensions,
    contiguity and writability, and a new combination is typed (and compiled or loaded) once."""

    def __init__(self):
        self.compiled = {}  # (dispatcher, the arrays' key) -> the compiled function

    def __call__(self, dispatcher, *args):
        """dispatcher(*args)."""
        key = (dispatcher, *((a.dtype, a.ndim, a.flags.c_contiguous, a.flags.f_contiguous, a.flags.writeable)
                             for a in args if isinstance(a, np.ndarray)))
        function = self.compiled.get(key)
        if function is None:
            function = self.compiled[key] = dispatcher.compile(tuple(map(dispatcher.typeof_pyval, args)))
        return function(*args)
