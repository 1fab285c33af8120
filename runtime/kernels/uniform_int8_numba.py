"""Integer-activation matvec of the uniform format (layout: runtime/formats/uniform.py).

The decode product y = W x with x quantized once per call to integers per
block of 32 (runtime/kernels/quant_activations_numba.py), the block being one
packed run of 32 input rows in storage order. With codes q, zero z and scale
s of group g, activation scale d_r and integer values xq of run r:

    y[n] = sum_g s[g, n] * ( sum_{r in g} d_r * dot_r[n]  -  z[g, n] * xsum[g] )
    dot_r[n] = sum_{k < 32} q[32 r + k, n] * xq[32 r + k]       (exact, int32)
    xsum[g]  = sum_{r in g} d_r * sum_k xq[32 r + k]

The activations take two bytes, xq = 256 high + low (LEVELS16: d = max|x| /
32639), and dot_r is two byte dot products, 256 * dot(q, high) + dot(q, low):
1/256 of the rounding of llama.cpp's one-byte Q8_0 activations, which cost
SmolLM2 rtn4g128 +0.42% WikiText-2 perplexity against float activations (two
bytes: -0.0005%), for about 2% of the 4-bit decode time. Codes that index a
table (below) take the same activations as int16. The reference is the float kernel
fed the dequantized activation d * xq (`UniformTensor.matmul_reference_int8`).

Blocked layout. The kernels do not read qweight [runs * bits, out] as it is
stored (each run's word rows are `bits` rows apart: `bits` memory streams per
task): `block_weight` copies it once, at the first decode step, into tiles of
TILE = 16 outputs, blocked [tiles, runs * bits * 16] int32, tile T holding,
run after run, the `bits` words of its 16 outputs (word t of run r of output
16 T + i at r * bits * 16 + t * 16 + i); outputs past the last whole tile are
zero codes, computed and dropped. Scales and zero points go with them,
[tiles, groups, 16]. A task walks a range of tiles from the first input to
the last: one contiguous stream, its 16 sums in registers through a group
(`_tile_codegen`: loops over groups and runs in LLVM IR), the group's
scale and zero applied once per group, no partial sums over tasks. Measured
on TinyLlama-1.1B's shapes (2 cores, AVX-512 VNNI): every projection of a
token 18.0 ms against 24.3 ms with the stored layout, about 27 GB/s.

Inside a 32-bit word of 2, 4 or 8 bits, byte i of word t of a run holds the
codes 32t/bits + (8/bits) i + s, s < 8/bits, at bit offset bits * s of the
byte; so `(word >> bits*s) & mask` (mask = 2**bits - 1 in every byte) is
four unsigned codes, one per byte, and the activations are permuted once per
call into the matching byte order (`xw`: eight 32-bit words per run, one per
(t, s)). Then one u8 x s8 dot product of four bytes per 32-bit lane does four
multiply-adds of one output:

- `avx512vnni`: `vpdpbusd` on the 16 outputs of a tile
  (llvm.x86.avx512.vpdpbusd.512); 2, 3, 4 and 8 bits.
- `avx2`: `vpmaddubsw` into int16 pairs, the run summed in int16 lanes, then
  one `vpmaddwd` by ones to int32, on each half of a tile (8 outputs); 2, 3
  and 4 bits (a run's int16 sum is at most 16 * 15 * 127 = 30480; 8-bit codes
  would saturate).
- `portable`: plain Numba integer code (shift, mask, multiply) over the 16
  lanes of a tile, which LLVM vectorizes on any CPU; every bit width (3 bits:
  codes 10 and 21 straddle two words).

Groups of 16 (SpQR's default, group_runs == HALF_RUN_GROUPS): each half run
is a group, so a run's dot product is taken as two, codes 0-15 and 16-31
(`_half_runs`: at every width the first four code vectors hold the first
half, so the halves cost no more dot products than a whole run), xsum is kept
per half run, and the statistics go with groups 2r and 2r + 1 (a last half run past
the inputs gets scale 0). A TinyLlama-1.1B MLP product (5632 x 2048, 3 bits)
decodes in 0.4 ms where the float kernels took 2.5-3 ms.

3 bits. A run's 32 codes fill its three words as one 96-bit number, code k
at bit 3k, so every 3 bytes hold 8 codes and codes 8q + 2 and 8q + 5 straddle
a byte boundary. The tile gathers byte m of each 3-byte group q into byte q of
a word P_m (shifts and masks within each lane, `_codes3`); vector j then
holds code 8q + j in byte q, cut from P_0..P_2 by one or two shifts and masks.
Bytes 0-1 of vectors j and j + 1 (j even) go into one code vector (codes j,
8 + j, j + 1, 9 + j) and bytes 2-3 into another (codes 16 + j ...), so the
first four code vectors hold the first half run, as at the other widths; the
activations meet them in that order (`tile_byte_order`). (With every vector
holding codes of both halves, SpQR's groups of 16 took each vector twice,
masked to either half: twice the dot products; TinyLlama-1.1B's 3-bit
prefill went from 60 to 76-80 tok/s.)

Tables. The same kernel runs 4-bit codes that index a 16-value table (NF4 and
FP4, the lut4 format repacked into this layout: runtime/kernels/lut4_numba.py).
One byte per value would round NF4's levels by up to 0.4% of the block's
absmax, the same rounding for every weight of a level, which measured +0.7%
WikiText-2 perplexity on SmolLM2; so a value is a signed 12-bit integer,
V[c] = rint(2047 * value[c] / max|value|) (runtime/formats/lut4.py
`lut_table`: 1/16 of the one-byte rounding), held as its high and low bytes.
Each code is looked up in both byte tables in the register (`vpshufb`, 16
bytes per 128-bit lane), the two results interleaved into int16 values
(`vpunpcklbw`/`vpunpckhbw`) and multiplied by the two-byte activations as
int16 pairs (`vpdpwssd`): two products per 64 weights, as many as the
uniform codes take, where two byte tables times two activation bytes took
four. A run of 32 sums at most 32 * 2047 * 32639 < 2^31: exact in int32.
The group scale carries absmax * max|value| / 2047. Only avx512vnni has
table tiles (`LUT_KERNELS`; avx2's `vpmaddubsw` would saturate).

The x86 paths are written as Numba intrinsics over LLVM vector types and are
compiled to nothing on a CPU without them (ARM), where `available_kernels`
never offers them. Several weights sharing the input (q/k/v, gate/up) go in
one call (`matvec_parts`): x is quantized once (or, given one input row per
part, each row once: QuIP's parts each see their own transformed input,
runtime/formats/incoherent.py). A call's arguments are
gathered once per list of weights (`prepare`) and reused every step (`run`).
Work is split over the tiles of all the call's weights; tiny products run on
the calling thread, the rest in one parallel region. Prefill reads the
blocked codes too once they exist (in integers with two-byte activations on
AVX-512 VNNI: runtime/kernels/uniform_prefill_numba.py; else
`dequantize_tiles` and BLAS), so the stored codes are not held twice.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import overload
from numba.core import cgutils

from runtime.formats.uniform import unpack
from runtime.kernels.numba_common import half_to_float, scale_value, variant_switch
from runtime.kernels.prefill_threads import run_tiles
from runtime.kernels.quant_activations_numba import BLOCK, LEVELS16, quantize_blocks
from runtime.kernels.uniform_numba import PREFILL_TILE, group_runs, kernel_arrays, readonly, storage_input

KERNELS = ("avx512vnni", "avx2", "portable")
SIMD_BITS = {"avx512vnni": (2, 3, 4, 8), "avx2": (2, 3, 4), "portable": ()}  # bit widths with SIMD tiles
LUT_KERNELS = ("avx512vnni",)  # kernels with SIMD tiles for 4-bit codes through a table (vpshufb)
NO_LUT = np.zeros(0, dtype=np.uint8)  # stands for "codes are the values"
NO_ROW_PTR, NO_COLUMNS, NO_VALUES = (readonly(np.zeros(0, dtype=np.int32)), readonly(np.zeros(0, dtype=np.uint16)),
                                     readonly(np.zeros(0, dtype=np.float32)))  # "no outliers" (CSR arrays)
NO_LUT.flags.writeable = False
TILE = 16  # outputs per tile of the blocked layout
LANES = {"avx512vnni": 16, "avx2": 8}  # outputs per SIMD register of each x86 kernel (a tile is TILE // LANES)
# (kernel, bits, table) of each SIMD tile kernel; `_SIMD_TILE` variant v runs entry v - 1
TILE_VARIANTS = (tuple((kernel, bits, False) for kernel in ("avx512vnni", "avx2") for bits in SIMD_BITS[kernel])
                 + tuple((kernel, 4, True) for kernel in LUT_KERNELS))
WORDS_PER_RUN = 8  # 32-bit activation words per run of 32 (32 int8 values)
MAX_PARTS = 3  # weights one call multiplies (q/k/v)
NO_OUTLIERS = (NO_ROW_PTR, NO_COLUMNS, NO_VALUES) * MAX_PARTS  # no part has outliers (`matvec_threads`)
HALF_RUN_GROUPS = 0  # group_runs of groups of 16 inputs, half a run (SpQR's default): run r is groups 2r, 2r + 1
HALF_RUN = BLOCK // 2
CODE_WORDS = TILE // 4  # words of a tile's statistic codes (a byte each) in coded statistics
PARALLEL_BYTES = 32 << 10  # packed codes below which a product runs on the calling thread (`prepare`)

CONTRACT = ("contract",)  # float products and sums LLVM may fuse into one FMA (one rounding instead of two)
_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


@functools.cache
def available_kernels() -> tuple:
    """The kernels the CPU that Numba compiles for supports, fastest first (NUMBA_CPU_NAME set: portable)."""
    if numba.config.CPU_NAME not in (None, "host"):
        return ("portable",)
    features = llvm.get_host_cpu_features()
    needs = {"avx512vnni": ("avx512vnni", "avx512bw"), "avx2": ("avx2",), "portable": ()}
    return tuple(k for k in KERNELS if all(features.get(f) for f in needs[k]))


# ---- the SIMD tiles: LLVM IR for the runs of one group on one tile of outputs -------------------

def _splat(builder, value, lanes):
    """<lanes x T> with every lane = value (a scalar IR value of type T)."""
    vector = ir.VectorType(value.type, lanes)
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes))


def _codes(builder, word, bits, s):
    """<L x i32>: the four codes at bit offset bits*s of every byte of each lane, one per byte."""
    if bits == 8:
        return word
    lanes = word.type.count
    mask = ir.Constant(word.type, [((1 << bits) - 1) * 0x01010101] * lanes)
    shifted = builder.lshr(word, ir.Constant(word.type, [bits * s] * lanes)) if s else word
    return builder.and_(shifted, mask)


def _codes3(builder, words):
    """The 8 code vectors (<L x i32>) of a 3-bit run from its 3 words: vector v < 4 holds codes j, 8 + j, j + 1,
    9 + j in bytes 0-3 (j = 2 v), vector 4 + v codes 16 + j, 24 + j, 17 + j, 25 + j: the first four vectors
    are the first half run."""
    w0, w1, w2 = words
    lanes = w0.type.count

    def const(value):
        return ir.Constant(w0.type, [value] * lanes)

    def part(word, shift, mask):  # (word shifted left by `shift`, right when negative) & mask
        moved = word if shift == 0 else (builder.shl(word, const(shift)) if shift > 0 else
                                         builder.lshr(word, const(-shift)))
        return builder.and_(moved, const(mask))

    def gather(*parts):  # byte q of the result from the parts' bytes
        out = part(*parts[0])
        for p in parts[1:]:
            out = builder.or_(out, part(*p))
        return out

    bytes_ = [gather((w0, 0, 0xFF), (w0, -16, 0xFF00), (w1, 0, 0xFF0000), (w2, 16, 0xFF000000)),  # bytes 3q
              gather((w0, -8, 0xFF), (w1, 8, 0xFF00), (w1, -8, 0xFF0000), (w2, 8, 0xFF000000)),  # bytes 3q + 1
              gather((w0, -16, 0xFF), (w1, 0, 0xFF00), (w2, 16, 0xFF0000), (w2, 0, 0xFF000000))]  # bytes 3q + 2
    p0, p1, p2 = bytes_
    sevens = 0x07070707
    by_offset = [part(p0, 0, sevens), part(p0, -3, sevens),  # vector j: code 8q + j in byte q
                 builder.or_(part(p0, -6, 0x03030303), part(p1, 2, 0x04040404)),  # bits 6-7 of P_0, bit 0 of P_1
                 part(p1, -1, sevens), part(p1, -4, sevens),
                 builder.or_(part(p1, -7, 0x01010101), part(p2, 1, 0x06060606)),  # bit 7 of P_1, bits 0-1 of P_2
                 part(p2, -2, sevens), part(p2, -5, sevens)]
    # vectors j, j + 1 (j even) -> bytes 0-1 of both (codes j, 8 + j, j + 1, 9 + j: the first half run)
    # and bytes 2-3 of both (codes 16 + j, 24 + j, 17 + j, 25 + j: the second)
    pairs = [(by_offset[j], by_offset[j + 1]) for j in range(0, 8, 2)]
    first = [builder.or_(part(a, 0, 0x0000FFFF), part(b, 16, -0x10000)) for a, b in pairs]  # -0x10000: 0xFFFF0000
    second = [builder.or_(part(a, -16, 0x0000FFFF), part(b, 0, -0x10000)) for a, b in pairs]
    return first + second


def _dot_vnni(builder, acc, codes, xword):
    """acc + per-lane dot of four u8 codes with four s8 activations (vpdpbusd); acc None: from zero."""
    vector = codes.type
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                        "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [ir.Constant(vector, None) if acc is None else acc, codes, xword])


def _dot_avx2(builder, acc, codes, xword):
    """acc (<16 x i16>) + the int16 pair sums of u8 codes times s8 activations (vpmaddubsw)."""
    bytes32 = ir.VectorType(_I8, 32)
    pairs = ir.VectorType(_I16, 16)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(pairs, [bytes32, bytes32]),
                                        "llvm.x86.avx2.pmadd.ub.sw")
    product = builder.call(fn, [builder.bitcast(codes, bytes32), builder.bitcast(xword, bytes32)])
    return product if acc is None else builder.add(acc, product)


def _widen_avx2(builder, acc):
    """<8 x i32> sums of adjacent int16 pairs of acc (vpmaddwd by ones)."""
    pairs = ir.VectorType(_I16, 16)
    fn = cgutils.get_or_insert_function(builder.module,
                                        ir.FunctionType(ir.VectorType(_I32, 8), [pairs, pairs]),
                                        "llvm.x86.avx2.pmadd.wd")
    return builder.call(fn, [acc, ir.Constant(pairs, [1] * 16)])


def _lookup_vnni(builder, codes, table):
    """<16 x i32> with each byte b of codes (a value < 16) replaced by table[b] (vpshufb; table <16 x i8>)."""
    bytes64 = ir.VectorType(_I8, 64)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(bytes64, [bytes64, bytes64]),
                                        "llvm.x86.avx512.pshuf.b.512")
    table64 = builder.shuffle_vector(table, ir.Constant(table.type, ir.Undefined),
                                     ir.Constant(ir.VectorType(_I32, 64), [i % 16 for i in range(64)]))
    return builder.bitcast(builder.call(fn, [table64, builder.bitcast(codes, bytes64)]), codes.type)


def _run_codes(builder, words, bits, tables):
    """The code vectors of one run from its `bits` words (<L x i32> each): 8 vectors of four codes per lane,
    in the order of the run's activation words (word t, then bit offset s; 3 bits: `_codes3`); with tables
    (high and low bytes, <16 x i8> each), each vector a pair (high bytes, low bytes) of its codes' table
    values (`vpshufb`)."""
    if bits == 3:
        return _codes3(builder, words)
    vectors = []
    for word in words:
        for s in range(8 // bits):
            codes = _codes(builder, word, bits, s)
            vectors.append(tuple(_lookup_vnni(builder, codes, table) for table in tables) if tables else codes)
    return vectors


def _run_dot(builder, vectors, x_high, x_low, x_wide, kernel):
    """<L x float> exact integer dot of one run: its code vectors (`_run_codes`) with its two-byte activations
    256 x_high + x_low (i32* to the run's WORDS_PER_RUN words of high and of low bytes). Table pairs go to
    `_table_run_dot` with the same activations as int16 (x_wide: i64* to the run's WORDS_PER_RUN groups of
    four)."""
    if isinstance(vectors[0], tuple):
        return _table_run_dot(builder, vectors, x_wide)
    lanes = vectors[0].type.count
    dot = _dot_vnni if kernel == "avx512vnni" else _dot_avx2
    high = low = None
    for v, vector in enumerate(vectors):
        x_words = [_splat(builder, builder.load(builder.gep(x, [ir.Constant(_I32, v)]), align=4), lanes)
                   for x in (x_high, x_low)]
        high = dot(builder, high, vector, x_words[0])
        low = dot(builder, low, vector, x_words[1])
    if kernel == "avx2":
        high, low = _widen_avx2(builder, high), _widen_avx2(builder, low)
    shifted = builder.shl(high, ir.Constant(high.type, [8] * lanes))
    return builder.sitofp(builder.add(shifted, low), ir.VectorType(_F32, lanes))


def _table_run_dot(builder, vectors, x_wide):
    """<16 x float> exact dot of one run of table codes (avx512vnni): each vector's (high, low) table bytes
    interleaved into int16 values V, four per output lane (`vpunpcklbw` takes outputs 4L, 4L + 1 of 128-bit
    lane L, `vpunpckhbw` 4L + 2, 4L + 3; each int32 lane then holds two values of one output), times its
    four int16 activations broadcast (vpdpwssd); an output's two int32 lanes are added at the end."""
    bytes64, words = ir.VectorType(_I8, 64), ir.VectorType(_I32, 16)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(words, [words] * 3),
                                        "llvm.x86.avx512.vpdpwssd.512")
    halves = [[16 * lane + k + 8 * h + 64 * b for lane in range(4) for k in range(8) for b in (0, 1)]
              for h in (0, 1)]  # bytes (low, high) of each int16 of the interleaved halves
    sums = [ir.Constant(words, None)] * 2
    for v, (high, low) in enumerate(vectors):
        x = _splat(builder, builder.load(builder.gep(x_wide, [ir.Constant(_I32, v)]), align=2), 8)  # <8 x i64>
        x = builder.bitcast(x, words)
        for h in (0, 1):
            values = builder.shuffle_vector(builder.bitcast(low, bytes64), builder.bitcast(high, bytes64),
                                            ir.Constant(ir.VectorType(_I32, 64), halves[h]))
            sums[h] = builder.call(fn, [sums[h], builder.bitcast(values, words), x])
    pairs = [[4 * (j // 4) + 2 * (j % 2) + 16 * (j % 4 // 2) + e for j in range(16)] for e in (0, 1)]
    even, odd = (builder.shuffle_vector(sums[0], sums[1], ir.Constant(ir.VectorType(_I32, 16), p)) for p in pairs)
    return builder.sitofp(builder.add(even, odd), ir.VectorType(_F32, 16))


def _load_lanes(builder, group, h, lanes, dtype):
    """<lanes x float>: statistics h * lanes .. h * lanes + lanes - 1 of one tile and group (group: i8* to
    them) stored as `dtype`: float32, float16 bits (uint16, widened by fpext: vcvtph2ps), uint8 codes, or
    coded statistics (uint32, `coded_statistics`: low + code * step in float32)."""
    floats = ir.VectorType(_F32, lanes)

    def at(offset, element):  # <lanes x element>* at byte `offset` of the group
        pointer = builder.gep(group, [ir.Constant(_I32, offset)])
        return builder.bitcast(pointer, ir.VectorType(element, lanes).as_pointer())

    if dtype == types.float32:
        return builder.load(at(4 * h * lanes, _F32), align=4)
    if dtype == types.uint16:
        return builder.fpext(builder.load(at(2 * h * lanes, ir.HalfType()), align=2), floats)
    codes = builder.uitofp(builder.load(at(h * lanes, _I8), align=1), floats)
    if dtype == types.uint8:
        return codes
    word = builder.load(builder.bitcast(builder.gep(group, [ir.Constant(_I32, 4 * CODE_WORDS)]), _I32.as_pointer()))
    low, step = (builder.fpext(builder.bitcast(builder.trunc(part, _I16), ir.HalfType()), _F32)
                 for part in (word, builder.lshr(word, ir.Constant(_I32, 16))))
    return builder.fadd(_splat(builder, low, lanes), builder.fmul(codes, _splat(builder, step, lanes)))


def _table_bytes(builder, data):
    """(high bytes, low bytes) <16 x i8> each of a table's int16 values (uint8 [32] at data, high first)."""
    vectors = builder.bitcast(data, ir.VectorType(_I8, 16).as_pointer())
    return tuple(builder.load(builder.gep(vectors, [ir.Constant(_I32, i)]), align=1) for i in (0, 1))


def _group_span(builder, g, group_runs, n_runs):
    """(first run, runs) of group g: group_runs runs, fewer in the last group."""
    run0 = builder.mul(g, group_runs)
    left = builder.sub(n_runs, run0)
    return run0, builder.select(builder.icmp_signed("<", group_runs, left), group_runs, left)


def _fold_group(builder, total, group_sums, group_scales, group_zeros, group_sum):
    """*total += scales * (*group_sums - zeros * group_sum): one group's scaled run sums into an output's total
    (total, group_sums: pointers to float vectors)."""
    term = builder.fsub(builder.load(group_sums), builder.fmul(group_zeros, group_sum, flags=CONTRACT), flags=CONTRACT)
    builder.store(builder.fadd(builder.load(total), builder.fmul(group_scales, term, flags=CONTRACT), flags=CONTRACT),
                  total)


def _half_runs(vectors):
    """A run's code vectors (`_run_codes`) as its two half runs, codes 0-15 and 16-31: (vectors, index of
    their first activation word) each; at every width the first four vectors hold codes 0-15."""
    return [(vectors[:4], 0), (vectors[4:], 4)]


def _group_loops(builder, group_runs, n_runs, n_groups, sums, run_terms, fold, half_runs=True):
    """The loops over groups and runs of a tile (decode) or a chunk of rows (prefill), in IR. For each group g,
    the float vectors at `sums` start at zero, gain the terms of the group's runs, then go to fold(g).
    run_terms(r, split) gives run r's terms ([terms in the order of sums]; split: one list per half run).
    group_runs > 0: group g is runs g * group_runs ...; group_runs == HALF_RUN_GROUPS (with half_runs): run r
    is groups 2 r and 2 r + 1 (SpQR's groups of 16), chosen at run time."""
    zero = ir.Constant(sums[0].type.pointee, None)

    def whole_runs():
        with cgutils.for_range(builder, n_groups) as groups:
            run0, runs = _group_span(builder, groups.index, group_runs, n_runs)
            for total in sums:
                builder.store(zero, total)
            with cgutils.for_range(builder, runs) as loop:
                (terms,) = run_terms(builder.add(run0, loop.index), False)
                for total, term in zip(sums, terms):
                    builder.store(builder.fadd(builder.load(total), term, flags=CONTRACT), total)
            fold(groups.index)

    def halves():
        with cgutils.for_range(builder, n_runs) as loop:
            r = loop.index
            for part, terms in enumerate(run_terms(r, True)):
                for total, term in zip(sums, terms):
                    builder.store(term, total)
                fold(builder.add(builder.mul(r, ir.Constant(r.type, 2)), ir.Constant(r.type, part)))

    if not half_runs:
        whole_runs()
        return
    with builder.if_else(builder.icmp_signed("==", group_runs, ir.Constant(group_runs.type, HALF_RUN_GROUPS))) \
            as (then, otherwise):
        with then:
            halves()
        with otherwise:
            whole_runs()


def _run_parts(builder, vectors, bits, split, dot):
    """[dot(vectors, first activation word)] of a whole run, or one per half run (split, `_half_runs`)."""
    return [dot(part, offset) for part, offset in (_half_runs(vectors) if split else [(vectors, 0)])]


def _tile_codegen(bits: int, kernel: str, lut: bool = False):
    """The code of tile(blocked, tile, scales, zeros, xw, xw_low, d, x16, xsum, table, group_runs, y, y0) (types:
    `_tile_typer`) setting y[y0 : y0 + TILE] to W x for the TILE outputs of tile `tile` (blocked [tiles, runs * bits
    * TILE] int32, scales and zeros [tiles, groups, TILE], all C-contiguous): for each group g, the scaled run sums
    sum_r d[r] * dot_r, dot_r the exact integer dot product of run r's codes with its two-byte activations 256 xw +
    xw_low (words 8 r .. 8 r + 7 of each, int8 viewed as int32), times the group's scales, less its zero points
    times xsum[g]; with group_runs == HALF_RUN_GROUPS each half run is a group. The loops over groups and runs are
    LLVM IR (`_group_loops`), every sum a register, the memory one stream of codes. With `lut` (4 bits, avx512vnni;
    whole runs) each code c stands for the int16 with high byte table[c] and low byte table[16 + c] (uint8 [32]),
    multiplied by the same activations as int16 (x16, in the tiles' byte order; `_table_run_dot`)."""
    lanes = LANES[kernel]
    halves = TILE // lanes

    def codegen(context, builder, signature, args):
        if kernel not in available_kernels():  # compiled, never run: Python picks only available kernels
            return context.get_dummy_value()
        tile, group_runs, y0 = args[1], args[10], args[12]
        arrays = {i: context.make_array(signature.args[i])(context, builder, args[i])
                  for i in (0, 2, 3, 4, 5, 6, 7, 8, 9, 11)}
        scale_type, zero_type = signature.args[2].dtype, signature.args[3].dtype

        def tile_row(i):  # i8* to tile `tile` of array argument i, and its bytes per group (axis 1)
            strides = cgutils.unpack_tuple(builder, arrays[i].strides)
            data = builder.bitcast(arrays[i].data, _I8.as_pointer())
            return builder.gep(data, [builder.mul(tile, strides[0])]), (strides[1] if len(strides) > 1 else None)

        row, _ = tile_row(0)
        scale_row, scale_step = tile_row(2)
        zero_row, zero_step = tile_row(3)
        x_data, low_data = (builder.bitcast(arrays[i].data, _I32.as_pointer()) for i in (4, 5))
        d_data, xsum_data = arrays[6].data, arrays[8].data
        wide_data = builder.bitcast(arrays[7].data, ir.IntType(64).as_pointer())
        n_runs = cgutils.unpack_tuple(builder, arrays[6].shape)[0]
        n_groups = cgutils.unpack_tuple(builder, arrays[2].shape)[1]
        vector = ir.VectorType(_I32, lanes)
        floats = ir.VectorType(_F32, lanes)
        tables = _table_bytes(builder, arrays[9].data) if lut else ()
        totals = [cgutils.alloca_once_value(builder, ir.Constant(floats, None)) for _ in range(halves)]
        sums = [cgutils.alloca_once(builder, floats) for _ in range(halves)]

        def run_terms(r, split):  # [[d[r] * dot of each tile half]] of run r (split: of each half run)
            words = builder.bitcast(builder.gep(row, [builder.mul(r, ir.Constant(r.type, bits * TILE * 4))]),
                                    vector.as_pointer())  # the run's words, TILE lanes each
            first = builder.mul(r, ir.Constant(r.type, WORDS_PER_RUN))
            x_run, x_low, x_wide = (builder.gep(x, [first]) for x in (x_data, low_data, wide_data))
            scale = _splat(builder, builder.load(builder.gep(d_data, [r])), lanes)
            dots = []
            for h in range(halves):
                run_words = [builder.load(builder.gep(words, [ir.Constant(_I32, t * halves + h)]), align=4)
                             for t in range(bits)]
                dots.append(_run_parts(builder, _run_codes(builder, run_words, bits, tables), bits, split,
                                       lambda vectors, at: _run_dot(builder, vectors, *(
                                           builder.gep(x, [ir.Constant(_I32, at)]) for x in (x_run, x_low, x_wide)),
                                           kernel)))
            return [[builder.fmul(dots[h][part], scale, flags=CONTRACT) for h in range(halves)]
                    for part in range(len(dots[0]))]

        def fold(g):
            group_sum = _splat(builder, builder.load(builder.gep(xsum_data, [g])), lanes)
            scale_at = builder.gep(scale_row, [builder.mul(g, scale_step)])
            zero_at = builder.gep(zero_row, [builder.mul(g, zero_step)])
            for h in range(halves):
                group_scales = _load_lanes(builder, scale_at, h, lanes, scale_type)
                group_zeros = _load_lanes(builder, zero_at, h, lanes, zero_type)
                _fold_group(builder, totals[h], sums[h], group_scales, group_zeros, group_sum)

        _group_loops(builder, group_runs, n_runs, n_groups, sums, run_terms, fold, half_runs=not lut)
        out = builder.bitcast(builder.gep(arrays[11].data, [y0]), floats.as_pointer())
        for h in range(halves):
            builder.store(builder.load(totals[h]), builder.gep(out, [ir.Constant(_I32, h)]), align=4)
        return context.get_dummy_value()

    return codegen


def _tile_typer(typingctx, blocked, tile, scales, zeros, xw, xw_low, d, x16, xsum, table, group_runs, y, y0):
    """The signature of a tile kernel (`_tile_codegen`)."""
    return types.void(blocked, types.int64, scales, zeros, xw, xw_low, d, x16, xsum, table, types.int64, y,
                      types.int64), None


# _SIMD_TILE(variant, ...): the tile kernel TILE_VARIANTS[variant - 1] (`tile_variant`)
_SIMD_TILE = variant_switch(_tile_typer, [_tile_codegen(bits, kernel, lut) for kernel, bits, lut in TILE_VARIANTS])


# ---- the portable lanes ------------------------------------------------------------------------

@njit(inline="always")
def _run_portable(row, run, bits, xq, values, dot):
    """dot [TILE] int64 = run `run`'s exact dot products of one tile (row: its blocked words), plain integer
    code; values (int64 [16]; empty: none) maps each 4-bit code to its table value."""
    dot[:] = 0
    base = run * bits * TILE
    x0 = run * BLOCK
    if bits == 3:  # codes 10 and 21 straddle two words
        seven = np.int32(7)
        for j in range(10):
            xa, xb, xc = np.int64(xq[x0 + j]), np.int64(xq[x0 + 11 + j]), np.int64(xq[x0 + 22 + j])
            sa, sb, sc = np.int32(3 * j), np.int32(3 * j + 1), np.int32(3 * j + 2)
            for i in range(TILE):
                dot[i] += (((row[base + i] >> sa) & seven) * xa + ((row[base + TILE + i] >> sb) & seven) * xb
                           + ((row[base + 2 * TILE + i] >> sc) & seven) * xc)
        x10, x21 = np.int64(xq[x0 + 10]), np.int64(xq[x0 + 21])
        for i in range(TILE):
            w0, w1, w2 = row[base + i], row[base + TILE + i], row[base + 2 * TILE + i]
            code10 = ((w0 >> np.int32(30)) & np.int32(3)) | ((w1 & np.int32(1)) << np.int32(2))
            code21 = ((w1 >> np.int32(31)) & np.int32(1)) | ((w2 & np.int32(3)) << np.int32(1))
            dot[i] += code10 * x10 + code21 * x21
        return
    per_word = 32 // bits
    mask = np.int32((1 << bits) - 1)
    for t in range(bits):
        for j in range(per_word):
            xj = np.int64(xq[x0 + t * per_word + j])
            shift = np.int32(j * bits)
            for i in range(TILE):
                code = (row[base + t * TILE + i] >> shift) & mask
                dot[i] += (values[code] if values.shape[0] > 0 else code) * xj


def stat_lanes(stats, tile, g, out):
    """out [TILE] float32 = the statistics of tile `tile` and group g (stats [tiles, groups, ...] as `_load_lanes`
    reads them); compiled through the overload below."""
    raise NotImplementedError("called from compiled code only")


@overload(stat_lanes, inline="always")
def _stat_lanes(stats, tile, g, out):
    if stats.dtype == types.uint32:
        def coded(stats, tile, g, out):
            word = stats[tile, g, CODE_WORDS]
            low = half_to_float(np.uint16(word & np.uint32(0xFFFF)))
            step = half_to_float(np.uint16(word >> np.uint32(16)))
            for i in range(TILE):
                code = (stats[tile, g, i // 4] >> np.uint32(8 * (i % 4))) & np.uint32(0xFF)
                out[i] = low + np.float32(code) * step
        return coded

    def values(stats, tile, g, out):  # float16 bits, float32 or uint8 codes, one per lane
        for i in range(TILE):
            out[i] = scale_value(stats[tile, g, i])
    return values


@njit(inline="always")
def _fold_portable(total, scales, zeros, tile, g, sums, group_sum, stats):
    """total[i] += scale * (sums[i] - zero * group_sum): group g's scaled run sums into the tile's totals
    (stats [2, TILE] float32: scratch for the group's scales and zeros)."""
    stat_lanes(scales, tile, g, stats[0])
    stat_lanes(zeros, tile, g, stats[1])
    for i in range(TILE):
        total[i] += stats[0, i] * (sums[i] - stats[1, i] * group_sum)


@njit(cache=True, fastmath=True)
def _tile_portable(blocked, tile, scales, zeros, xq, xq_first, d, xsum, values, bits, group_runs, dot, dot_first,
                   sums, stats, y, y0):
    """`_tile_codegen` in plain Numba code, any bit width; values: the table's int64 values (empty: none);
    dot, dot_first [TILE] int64, sums [TILE] and stats [2, TILE] float32: the caller's scratch (one run's exact
    dot products, one group's scaled run sums, its statistics). Groups of half runs (group_runs ==
    HALF_RUN_GROUPS) take the first half's dot products from xq_first (xq with each run's second half zero) and
    the second's as the difference."""
    row = blocked[tile]  # [runs * bits * TILE]
    total = y[y0:y0 + TILE]  # [TILE]
    total[:] = 0
    if group_runs == HALF_RUN_GROUPS:
        for run in range(d.shape[0]):
            _run_portable(row, run, bits, xq, values, dot)
            _run_portable(row, run, bits, xq_first, values, dot_first)
            for part in range(2):
                for i in range(TILE):
                    sums[i] = d[run] * np.float32(dot_first[i] if part == 0 else dot[i] - dot_first[i])
                g = 2 * run + part
                _fold_portable(total, scales, zeros, tile, g, sums, xsum[g], stats)
        return
    for g in range(scales.shape[1]):
        sums[:] = 0
        for run in range(g * group_runs, min((g + 1) * group_runs, d.shape[0])):
            _run_portable(row, run, bits, xq, values, dot)
            for i in range(TILE):
                sums[i] += d[run] * np.float32(dot[i])
        # xsum[g] goes in as a value, read once: read in the loop, stores into total could alias it (no SIMD)
        _fold_portable(total, scales, zeros, tile, g, sums, xsum[g], stats)


# ---- the matvec --------------------------------------------------------------------------------

@njit(cache=True)
def quantize_input(x, perm, bits, n_runs, group_runs, n_groups):
    """(xq [runs*32] int16, xw, xw_low [runs*32] int8, d [runs] float32, x16 [runs*32] int16, xsum [n_groups]
    float32) of x [in]: x gathered into storage order (perm; empty: identity) and zero-padded to whole runs,
    quantized per run to two-byte integers xq = 256 high + low (LEVELS16); xw the high bytes, xw_low the
    low bytes and x16 the values in the byte order of the SIMD tiles (`tile_byte_order`);
    xsum each group's d * sum of xq."""
    xq = np.empty(n_runs * BLOCK, dtype=np.int16)  # [runs*32]
    d = np.empty(n_runs, dtype=np.float32)  # [runs]
    quantize_stored(x, perm, n_runs, xq, d)
    xsum = np.zeros(n_groups, dtype=np.float32)  # [n_groups]
    xw = np.empty(n_runs * BLOCK, dtype=np.int8)  # [runs*32]
    xw_low = np.empty(n_runs * BLOCK, dtype=np.int8)  # [runs*32]
    x16 = np.empty(n_runs * BLOCK, dtype=np.int16)  # [runs*32]
    tile_order(xq, d, bits, group_runs, xw, xw_low, x16, xsum)
    return xq, xw, xw_low, d, x16, xsum


@njit(inline="always")
def quantize_stored(x, perm, n_runs, q, d):
    """q [runs*32] int16, d [runs] <- the two-byte activations (LEVELS16) of x [in] gathered into storage order
    (perm; empty: identity) and zero-padded to whole runs; x read where it is when it is in that order already
    (no padded copy: 128 rows of 5632 in prefill 1.3 -> 1.05 ms)."""
    if perm.shape[0] == 0 and x.shape[0] == n_runs * BLOCK:
        quantize_blocks(x, q, d, LEVELS16)
    else:
        quantize_blocks(storage_input(x, perm, n_runs), q, d, LEVELS16)


@njit(inline="always")
def tile_order(xq, d, bits, group_runs, high, low, wide, xsum):
    """Two-byte activations xq [runs*32] (storage order; d [runs] their scales) as the tiles of `bits` read them:
    at r*32 + j of high and low (its bytes: value = 256 high + low, high = (value + 128) >> 8 in [-127, 127], low
    in [-128, 127]) and of wide (the int16) each run's value `tile_byte_order` puts at j (`_ORDER_RUN`: one
    vector shuffle a run); xsum[g] += d * the sum of each run of group g, or of each half run (group_runs ==
    HALF_RUN_GROUPS, xsum [2 runs]) (`quantize_input`, uniform_prefill_numba.quantize_rows)."""
    variant = order_variant(bits)
    for r in range(d.shape[0]):
        base = r * BLOCK
        first = second = np.int32(0)
        for k in range(HALF_RUN):
            first += np.int32(xq[base + k])
            second += np.int32(xq[base + HALF_RUN + k])
        _ORDER_RUN(variant, xq, base, high, low, wide)
        if group_runs == HALF_RUN_GROUPS:
            xsum[2 * r] += d[r] * np.float32(first)
            xsum[2 * r + 1] += d[r] * np.float32(second)
        else:
            xsum[r // group_runs] += d[r] * np.float32(first + second)


ORDER_BITS = (2, 3, 4)  # widths whose tiles meet a run's activations out of storage order (8 bits: in it)


@njit(inline="always")
def order_variant(bits):
    """The `_ORDER_RUN` variant of codes of `bits`: 1 + its index in ORDER_BITS, or the storage order (other
    widths: 8 bits, and those only the portable lanes run, which read xq)."""
    for i in range(len(ORDER_BITS)):
        if ORDER_BITS[i] == bits:
            return i + 1
    return len(ORDER_BITS) + 1


def _order_typer(typingctx, xq, base, high, low, wide):
    """The signature of a run's reordering (`_order_codegen`)."""
    return types.void(xq, types.int64, high, low, wide), None


def _order_codegen(bits):
    """The code of order_run(xq, base, high, low, wide): the 32 int16 of xq from `base`, permuted into the order of
    the tiles of `bits` (`tile_byte_order`; None: kept) by one shufflevector (vpermw on AVX-512), stored at `base`
    of wide and, split into high and low bytes, of high and low."""
    source = None if bits is None else [int(s) for s in tile_byte_order.py_func(np.arange(BLOCK, dtype=np.int8), bits)]

    def codegen(context, builder, signature, args):
        xq, high, low, wide = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 3, 4))
        base = args[1]
        run16, run8 = ir.VectorType(_I16, BLOCK), ir.VectorType(_I8, BLOCK)

        def at(array, vector):
            return builder.bitcast(builder.gep(array.data, [base]), vector.as_pointer())

        values = builder.load(at(xq, run16), align=2)
        if source is not None:
            values = builder.shuffle_vector(values, ir.Constant(run16, ir.Undefined),
                                            ir.Constant(ir.VectorType(_I32, BLOCK), source))
        high_bytes = builder.ashr(builder.add(values, ir.Constant(run16, [128] * BLOCK)),
                                  ir.Constant(run16, [8] * BLOCK))
        low_bytes = builder.sub(values, builder.shl(high_bytes, ir.Constant(run16, [8] * BLOCK)))
        builder.store(values, at(wide, run16), align=2)
        builder.store(builder.trunc(high_bytes, run8), at(high, run8), align=1)
        builder.store(builder.trunc(low_bytes, run8), at(low, run8), align=1)
        return context.get_dummy_value()

    return codegen


@njit(cache=True)
def tile_byte_order(xq, bits):
    """xq [runs*32] (int8) in the byte order of the SIMD tiles for `bits`: the four bytes of activation word
    t * 8/bits + s of a run meet the four codes at bit offset bits * s of the bytes of the run's code word t
    (2, 4, 8 bits); for 3 bits the bytes of word v meet codes j, 8 + j, j + 1, 9 + j (v < 4, j = 2 v) or
    16 + j, 24 + j, 17 + j, 25 + j (v = 4 + j / 2) (`_codes3`)."""
    xw = xq.copy()  # [runs*32]
    if bits == 3:
        for r in range(xq.shape[0] // BLOCK):
            for v in range(8):
                j = 2 * (v % 4) + 16 * (v // 4)  # the first code of word v
                for i, offset in enumerate((0, 8, 1, 9)):
                    xw[r * BLOCK + 4 * v + i] = xq[r * BLOCK + j + offset]
    else:
        per_word = 32 // bits
        sub = 8 // bits  # codes per byte
        for r in range(xq.shape[0] // BLOCK):
            for t in range(bits):
                for s in range(sub):
                    for i in range(4):
                        xw[r * BLOCK + 4 * (t * sub + s) + i] = xq[r * BLOCK + t * per_word + sub * i + s]
    return xw


# _ORDER_RUN(variant, ...): a run's activations in the order of the tiles of ORDER_BITS[variant - 1] (`order_variant`)
_ORDER_RUN = variant_switch(_order_typer, [_order_codegen(bits) for bits in ORDER_BITS] + [_order_codegen(None)])


@njit(cache=True)
def _tiles(variant, blocked, scales, zeros, quantized, bits, group_runs, lut, t0, t1, y):
    """y[16 (T - t0) + i] = (W x)[16 T + i] for the tiles T = t0 .. t1-1 of one weight, by the SIMD tile kernel
    `variant` (`tile_variant`), or with variant 0 the portable lanes: per group, the scaled run sums of the
    group times the group's scale, less its zero point times the group's activation sum (tables: zero 0)."""
    xq, xw, xw_low, d, x16, xsum = quantized
    values = np.empty(16 if lut.shape[0] > 0 else 0, dtype=np.int64)  # [16] the table's signed values
    for c in range(values.shape[0]):
        value = np.int64(lut[c]) * 256 + np.int64(lut[16 + c])
        values[c] = value - 65536 if value >= 32768 else value
    dot = np.empty(TILE if variant == 0 else 0, dtype=np.int64)  # [TILE] the portable lanes' scratch
    dot_first = np.empty_like(dot)  # [TILE]
    sums = np.empty(TILE if variant == 0 else 0, dtype=np.float32)  # [TILE]
    stats = np.empty((2, TILE if variant == 0 else 0), dtype=np.float32)  # [2, TILE] a group's scales, zeros
    xq_first = np.empty(0, dtype=xq.dtype)  # [runs*32] xq with each run's second half zero (half-run groups)
    if variant == 0 and group_runs == HALF_RUN_GROUPS:
        xq_first = xq.copy()
        for r in range(d.shape[0]):
            xq_first[r * BLOCK + HALF_RUN:(r + 1) * BLOCK] = 0
    for tile in range(t0, t1):
        if variant > 0:
            _SIMD_TILE(variant, blocked, tile, scales, zeros, xw, xw_low, d, x16, xsum, lut, group_runs, y,
                       (tile - t0) * TILE)
        else:
            _tile_portable(blocked, tile, scales, zeros, xq, xq_first, d, xsum, values, bits, group_runs, dot,
                           dot_first, sums, stats, y, (tile - t0) * TILE)


@njit(inline="always")
def _add_outliers(row_ptr, col_idx, values, x, o0, o1, y):
    """y[o - o0] += sum_k values[k] * x[col_idx[k]] over the entries k of the CSR rows o = o0 .. o1-1 (SpQR's
    outlier corrections, runtime/formats/sparse.py; rows past row_ptr's end: none)."""
    for o in range(o0, min(o1, row_ptr.shape[0] - 1)):
        acc = np.float32(0)
        for k in range(row_ptr[o], row_ptr[o + 1]):
            acc += values[k] * x[np.int64(col_idx[k])]
        y[o - o0] += acc


@njit(inline="always")
def _job(t, tasks, variant, b0, s0, z0, b1, s1, z1, b2, s2, z2, n_parts, q0, q1, q2, bits, group_runs, lut, y,
         x, r0, c0, v0, r1, c1, v1, r2, c2, v2):
    """Task t of the matvec: tiles t*N/tasks .. (t+1)*N/tasks of the N tiles of all parts, part after part,
    into y [N * TILE]; part p reads the quantized input (q0, q1, q2)[p] (`_inputs`), then adds the outliers
    (r, c, v)[p] (CSR, empty: none) of the same outputs times its float input x[p] (x [1 or parts, in])."""
    blocks = (b0, b1, b2)
    sparse = ((r0, c0, v0), (r1, c1, v1), (r2, c2, v2))
    n_tiles = 0
    for p in range(n_parts):
        n_tiles += blocks[p].shape[0]
    first, last = t * n_tiles // tasks, (t + 1) * n_tiles // tasks
    start = 0  # the part's first tile among all
    for p in range(n_parts):
        count = blocks[p].shape[0]
        a, b = max(first, start), min(last, start + count)
        if a < b:
            _tiles(variant, blocks[p], (s0, s1, s2)[p], (z0, z1, z2)[p], (q0, q1, q2)[p], bits, group_runs, lut,
                   a - start, b - start, y[a * TILE:b * TILE])
            row_ptr, col_idx, values = sparse[p]
            _add_outliers(row_ptr, col_idx, values, x[min(p, x.shape[0] - 1)], (a - start) * TILE,
                          (b - start) * TILE, y[a * TILE:b * TILE])
        start += count


@njit(inline="always")
def _inputs(x, perm, bits, b0, s0, group_runs):
    """The quantized input (`quantize_input`) of each of the MAX_PARTS slots: x [1, in] one input for all
    parts, or x [parts, in] row p for part p (slots past x's rows repeat its last)."""
    n_runs, n_groups, last = b0.shape[1] // (bits * TILE), s0.shape[1], x.shape[0] - 1
    q0 = quantize_input(x[0], perm, bits, n_runs, group_runs, n_groups)
    q1 = q0 if last < 1 else quantize_input(x[1], perm, bits, n_runs, group_runs, n_groups)
    q2 = q1 if last < 2 else quantize_input(x[2], perm, bits, n_runs, group_runs, n_groups)
    return q0, q1, q2


@njit(cache=True)
def matvec_threads(variant, n_parts, b0, s0, z0, b1, s1, z1, b2, s2, z2, x, perm, bits, group_runs, lut, threads,
                   r0, c0, v0, r1, c1, v1, r2, c2, v2):
    """The prepared call (`prepare`) for x [1 or parts, in] (`_inputs`), adding each part's outliers
    (r, c, v)[p] (CSR; NO_OUTLIERS: none): y [tiles of all parts * TILE], in one parallel region of `threads`
    tasks, or on the calling thread for one (`run`, and every product of runtime/kernels/decode_layers_numba.py)."""
    if threads > 1:
        return _matvec_parallel(variant, n_parts, b0, s0, z0, b1, s1, z1, b2, s2, z2, x, perm, bits, group_runs,
                                lut, threads, r0, c0, v0, r1, c1, v1, r2, c2, v2)
    return _matvec_serial(variant, n_parts, b0, s0, z0, b1, s1, z1, b2, s2, z2, x, perm, bits, group_runs, lut,
                          r0, c0, v0, r1, c1, v1, r2, c2, v2)


@njit(cache=True, parallel=True)
def _matvec_parallel(variant, n_parts, b0, s0, z0, b1, s1, z1, b2, s2, z2, x, perm, bits, group_runs, lut,
                     threads, r0, c0, v0, r1, c1, v1, r2, c2, v2):
    """`matvec_threads` in one parallel region of `threads` tasks."""
    q0, q1, q2 = _inputs(x, perm, bits, b0, s0, group_runs)  # separate: a parallel region takes no nested tuple
    n_tiles = b0.shape[0] + (b1.shape[0] if n_parts > 1 else 0) + (b2.shape[0] if n_parts > 2 else 0)
    y = np.empty(n_tiles * TILE, dtype=np.float32)  # [tiles * TILE]
    tasks = min(threads, n_tiles)
    for t in prange(tasks):
        _job(t, tasks, variant, b0, s0, z0, b1, s1, z1, b2, s2, z2, n_parts, q0, q1, q2, bits, group_runs, lut, y,
             x, r0, c0, v0, r1, c1, v1, r2, c2, v2)
    return y


@njit(cache=True)
def _matvec_serial(variant, n_parts, b0, s0, z0, b1, s1, z1, b2, s2, z2, x, perm, bits, group_runs, lut,
                   r0, c0, v0, r1, c1, v1, r2, c2, v2):
    """`matvec_threads` on the calling thread alone."""
    q0, q1, q2 = _inputs(x, perm, bits, b0, s0, group_runs)
    n_tiles = b0.shape[0] + (b1.shape[0] if n_parts > 1 else 0) + (b2.shape[0] if n_parts > 2 else 0)
    y = np.empty(n_tiles * TILE, dtype=np.float32)  # [tiles * TILE]
    _job(0, 1, variant, b0, s0, z0, b1, s1, z1, b2, s2, z2, n_parts, q0, q1, q2, bits, group_runs, lut, y,
         x, r0, c0, v0, r1, c1, v1, r2, c2, v2)
    return y


# ---- the weights -------------------------------------------------------------------------------

class KernelWeight(NamedTuple):
    """One weight in the blocked layout the kernels read (`block_weight`): the uniform format, SpQR's dense
    part (SpQRTensor.kernel_statistics), or 4-bit codes that index a table (the lut4 format,
    runtime/kernels/lut4_numba.py)."""
    blocked: np.ndarray  # int32 [tiles, runs * bits * TILE] codes, tile by tile, run by run
    scales: np.ndarray  # [tiles, groups, TILE]: uint16 (float16 bits) or float32; or coded (`coded_statistics`)
    zeros: np.ndarray  # [tiles, groups, TILE] zero points: uint8 codes, float32 values (0 with a table), or coded
    perm: np.ndarray  # int32 [in] storage order (empty: identity)
    in_features: int
    out_features: int
    bits: int
    group_runs: int
    lut: np.ndarray  # uint8 [32] code c -> the int16 of high byte lut[c], low byte lut[16 + c] (4 bits); empty: none
    outliers: tuple = ()  # (row_ptr int32 [out+1], col_idx uint16 [nnz], values float32 [nnz]): CSR entries the
    #                       decode kernels add (SpQR's outlier corrections, SpQRTensor.int8_weight); (): none


@njit(cache=True, parallel=True)
def _tile_copy(a, out):
    """out[t, r, i] = a[r, TILE t + i], zero past a's last column (a [rows, n], out [tiles, rows, TILE])."""
    for t in prange(out.shape[0]):
        for r in range(a.shape[0]):
            for i in range(TILE):
                n = t * TILE + i
                out[t, r, i] = a[r, n] if n < a.shape[1] else 0


def _tiled(a: np.ndarray) -> np.ndarray:
    """a [rows, out] -> [tiles, rows, TILE], outputs zero-padded to whole tiles (a read-only copy, made on
    every core: it is the first product's wait, 1.7 -> 1.0 s for TinyLlama-1.1B)."""
    rows, n_out = a.shape
    out = np.empty((-(-n_out // TILE), rows, TILE), dtype=a.dtype)  # [tiles, rows, TILE]
    _tile_copy(a, out)
    return readonly(out)


def block_weight(qweight, scales, zeros, perm, in_features: int, bits: int, group_runs: int,
                 lut=NO_LUT) -> KernelWeight:
    """The KernelWeight of codes in the uniform format's layout (qweight int32 [runs * bits, out]) with
    scales [groups, out] (uint16 float16 bits or float32) and zero points [groups, out] (uint8 codes or
    float32 values): the codes copied into tiles (blocked [tiles, runs * bits * TILE]), the statistics too."""
    runs = qweight.shape[0] // bits
    codes = _tiled(np.asarray(qweight).reshape(runs * bits, -1))  # [tiles, runs * bits, TILE]
    tiled = []
    for a in (scales, zeros):  # [groups, out], or coded [tiles, groups, CODE_WORDS + 1]
        group_axis = a.ndim - 2
        if group_runs == HALF_RUN_GROUPS:  # two groups a run: a last half run past the inputs gets scale 0
            pad = [(0, 0)] * a.ndim
            pad[group_axis] = (0, 2 * runs - a.shape[group_axis])
            a = np.pad(a, pad)  # [.., 2 runs, ..]
        tiled.append(_tiled(a) if a.ndim == 2 else readonly(np.ascontiguousarray(a)))
    return KernelWeight(codes.reshape(codes.shape[0], -1), *tiled, perm, in_features, qweight.shape[1], bits,
                        group_runs, lut)


def coded_statistics(codes, step, low, stat_group: int) -> np.ndarray:
    """Statistics low + code * step (codes uint8 [groups, out]; step, low float16 [groups, blocks] of stat_group
    outputs, a multiple of TILE) as the kernels read them: uint32 [tiles, groups, CODE_WORDS + 1], per tile and
    group the TILE codes as bytes (CODE_WORDS words), then low's float16 bits | step's << 16 (5 words for 16
    statistics, where float32 takes 16)."""
    if stat_group % TILE:
        raise ValueError(f"coded statistics need blocks of whole tiles, not {stat_group}")
    words = _tiled(np.asarray(codes, dtype=np.uint8))  # [tiles, groups, TILE]
    block = np.arange(words.shape[0]) * TILE // stat_group  # [tiles] the block of each tile
    affine = (np.asarray(low, np.float16).view(np.uint16).astype(np.uint32)
              | np.asarray(step, np.float16).view(np.uint16).astype(np.uint32) << 16)  # [groups, blocks]
    return np.concatenate([words.view(np.uint32), affine[:, block].T[:, :, None]], axis=2)  # [tiles, groups, 5]


def kernel_weight(packed) -> KernelWeight:
    """The KernelWeight of a UniformTensor (a KernelWeight is returned as it is)."""
    if isinstance(packed, KernelWeight):
        return packed
    qweight, qzeros, scales, perm = kernel_arrays(packed)
    n_out = packed.out_features
    if packed.sym:
        zeros = np.full(scales.shape, 1 << (packed.bits - 1), dtype=np.uint8)  # [groups, out]
    else:
        zeros = unpack(np.ascontiguousarray(qzeros.T), packed.bits, n_out).T  # [groups, out] uint8
    return block_weight(qweight, scales, zeros, perm, packed.in_features, packed.bits, group_runs(packed))


def fusable(parts) -> bool:
    """Whether `matvec_parts` takes these weights (UniformTensor or KernelWeight) in one call: same input,
    grid, storage order and table."""
    weights = [kernel_weight(p) for p in parts]
    first = weights[0]
    grid = (first.in_features, first.bits, first.group_runs, first.scales.dtype, first.zeros.dtype)
    return len(parts) <= MAX_PARTS and all(
        (w.in_features, w.bits, w.group_runs, w.scales.dtype, w.zeros.dtype) == grid
        and np.array_equal(w.perm, first.perm) and np.array_equal(w.lut, first.lut) for w in weights)


class PreparedCall(NamedTuple):
    """`matvec_threads`' arguments but x and the thread count, for one list of fusable weights and one kernel:
    built once (`prepare`), run every decode step (`run`, or from Numba: runtime/kernels/decode_layers_numba.py)."""
    head: tuple  # variant, n_parts, then blocked, scales, zeros of each of MAX_PARTS slots
    tail: tuple  # perm, bits, group_runs, lut
    parallel: bool  # at least PARALLEL_BYTES of codes: one parallel region, else the calling thread
    outs: tuple  # out_features of each part (their tiles are padded to TILE outputs)
    whole_tiles: bool  # every part's outputs fill whole tiles: the kernel's y is the answer as it is
    outliers: tuple  # the CSR arrays (row_ptr, col_idx, values) of each of MAX_PARTS slots (none: NO_OUTLIERS)


def prepare(parts, kernel: str) -> PreparedCall | None:
    """The call computing (W x for W in parts) concatenated with int8 activations, for up to MAX_PARTS
    weights (UniformTensor or KernelWeight) sharing in_features, bits, grid, storage order and table;
    None when they do not (`fusable`). `kernel` one of KERNELS: SIMD tiles where it has them for the
    codes, portable code for the rest.

    Unused slots repeat part 0: arrays as separate arguments go through Numba's fast typing path
    (tuples of them cost ~12 us a call). The tiles of all parts are split evenly over the tasks, each
    streaming its tiles from the first input to the last. Products of fewer than PARALLEL_BYTES of codes
    run on the calling thread, where a parallel region costs more than it saves.
    """
    if not fusable(parts):
        return None
    weights = [kernel_weight(p) for p in parts]
    first = weights[0]
    slots = [(w.blocked, w.scales, w.zeros) for w in weights]
    slots += [slots[0]] * (MAX_PARTS - len(weights))
    variant = tile_variant(first.bits, kernel, first.lut.shape[0] > 0)
    head = (variant, len(weights), *(a for slot in slots for a in slot))
    parallel = sum(w.blocked.nbytes for w in weights) >= PARALLEL_BYTES
    outs = tuple(w.out_features for w in weights)
    outliers = NO_OUTLIERS
    if any(w.outliers for w in weights):
        sparse = [w.outliers or (readonly(np.zeros(w.out_features + 1, dtype=np.int32)), NO_COLUMNS, NO_VALUES)
                  for w in weights]  # read-only arrays each: the kernel picks a part's from a tuple
        outliers = tuple(a for arrays in sparse + [sparse[0]] * (MAX_PARTS - len(weights)) for a in arrays)
    return PreparedCall(head, (first.perm, first.bits, first.group_runs, first.lut), parallel, outs,
                        all(n % TILE == 0 for n in outs), outliers)


def run(call: PreparedCall, x: np.ndarray) -> np.ndarray:
    """y [sum of outs] of a prepared call for x [in] float32, or x [parts, in] with row p for part p (called
    once per product in decode: every microsecond here is paid hundreds of times a token)."""
    threads = numba.get_num_threads() if call.parallel else 1
    x = x.reshape(-1, x.shape[-1])  # [1 or parts, in]
    x = x if x.flags.writeable else x.copy()  # writable, as decode_layers_numba's: one compiled signature
    y = matvec_threads(*call.head, x, *call.tail, threads, *call.outliers)  # [tiles * TILE]
    if call.whole_tiles:
        return y
    return np.concatenate([y[a:a + n] for a, n in zip(part_starts(call.outs), call.outs)])


def part_starts(outs) -> np.ndarray:
    """int64 [parts]: where each part's outputs start in the kernel's y (each part padded to whole tiles)."""
    return np.cumsum([0] + [-(-n // TILE) * TILE for n in outs[:-1]])


def matvec_parts(parts, x: np.ndarray, kernel: str) -> np.ndarray:
    """y [sum of outs] = (W x for W in parts) concatenated, x [in] float32, int8 activations (parts
    `fusable`; see `prepare`)."""
    return run(prepare(parts, kernel), x)


def matvec(packed, x: np.ndarray, kernel: str) -> np.ndarray:
    """y [out] = W x for x [in] float32 with int8 activations (`matvec_parts` of one weight)."""
    return matvec_parts([packed], x, kernel)


def simd_tiles(bits: int, kernel: str, lut: bool = False) -> bool:
    """Whether `kernel` has SIMD tiles for `bits` (with a table: only 4 bits on avx512vnni, `LUT_KERNELS`)."""
    return tile_variant(bits, kernel, lut) > 0


def tile_variant(bits: int, kernel: str, lut: bool = False) -> int:
    """The variant number of `_SIMD_TILE` for these codes on `kernel`: 1 + its index in TILE_VARIANTS, or 0
    (the portable lanes) where it has no SIMD tiles for them."""
    key = (kernel, bits, lut)
    return TILE_VARIANTS.index(key) + 1 if key in TILE_VARIANTS else 0


# ---- prefill from the blocked codes ---------------------------------------------------------------

@njit(cache=True, nogil=True)
def dequantize_tiles(blocked, scales, zeros, bits, group_runs, values, t0, t1, out):
    """out[k, 16 (T - t0) + i] = scale * (values[code] - zero) of input k (storage order, padded to whole runs)
    and output 16 T + i, for the tiles T = t0 .. t1-1 (out [runs * 32, >= (t1 - t0) * TILE] float32);
    values [2**bits] float32 is each code's value (the code itself, or a table's value over its scale
    step). On the calling thread without the GIL (runtime/kernels/prefill_threads.py)."""
    n_runs = blocked.shape[1] // (bits * TILE)
    mask = np.int64((1 << bits) - 1)
    s = np.empty(TILE, dtype=np.float32)  # [TILE] the group's scales
    sz = np.empty(TILE, dtype=np.float32)  # [TILE] the group's zero points
    for tile in range(t0, t1):
        row = blocked[tile]  # [runs * bits * TILE]
        col = (tile - t0) * TILE
        for run in range(n_runs):
            for k in range(BLOCK):
                if k % HALF_RUN == 0:  # the group's statistics, at each half run
                    g = 2 * run + k // HALF_RUN if group_runs == HALF_RUN_GROUPS else run // group_runs
                    stat_lanes(scales, tile, g, s)
                    stat_lanes(zeros, tile, g, sz)
                bit = k * bits
                word, shift = bit // 32, bit % 32
                dest = out[run * BLOCK + k, col:col + TILE]  # [TILE]
                for i in range(TILE):
                    v = (np.int64(row[(run * bits + word) * TILE + i]) & np.int64(0xFFFFFFFF)) >> shift
                    if shift + bits > 32:
                        v |= (np.int64(row[(run * bits + word + 1) * TILE + i]) & np.int64(0xFFFFFFFF)) << (32 - shift)
                    dest[i] = s[i] * (values[v & mask] - sz[i])


def matmul_prefill(weight: KernelWeight, values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y [m, out] = x [m, in] @ W.T with float activations from the blocked codes: tiles of outputs dequantized
    (`dequantize_tiles`, values [2**bits] float32 the codes' values) and multiplied by BLAS on every core
    (what prefill runs once the blocked codes exist, so the stored codes are not read again)."""
    n_pad = weight.blocked.shape[1] // weight.bits * BLOCK // TILE  # inputs padded to whole runs
    n_tiles = weight.blocked.shape[0]
    xs = np.zeros((x.shape[0], n_pad), dtype=np.float32)  # [m, in_pad] storage order, zero padded
    xs[:, :weight.in_features] = x if weight.perm.shape[0] == 0 else x[:, weight.perm]
    width = max(1, PREFILL_TILE // n_pad // TILE)  # tiles per dequantized buffer
    y = np.empty((x.shape[0], n_tiles * TILE), dtype=np.float32)  # [m, tiles * TILE]

    def fill(t0, count, buffer):  # buffer [in_pad, width * TILE]
        dequantize_tiles(weight.blocked, weight.scales, weight.zeros, weight.bits, weight.group_runs, values, t0,
                         t0 + count, buffer)

    def multiply(t0, count, buffer):
        np.matmul(xs, buffer[:, :count * TILE], out=y[:, t0 * TILE:(t0 + count) * TILE])  # [m, count * TILE]

    run_tiles(n_tiles, width, (n_pad, width * TILE), fill, multiply)
    return y[:, :weight.out_features]
