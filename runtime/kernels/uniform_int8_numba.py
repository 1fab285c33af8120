"""Integer-activation matvec of the uniform format (layout: runtime/formats/uniform.py).

The decode product y = W x with x quantized once per call to int8 per block
of 32 (llama.cpp's Q8_0 activations, runtime/kernels/quant_activations_numba.py),
the block being one packed run of 32 input rows in storage order. With codes
q, zero z and scale s of group g, activation scale d_r and int8 values xq of
run r:

    y[n] = sum_g s[g, n] * ( sum_{r in g} d_r * dot_r[n]  -  z[g, n] * xsum[g] )
    dot_r[n] = sum_{k < 32} q[32 r + k, n] * xq[32 r + k]       (exact, int32)
    xsum[g]  = sum_{r in g} d_r * sum_k xq[32 r + k]

The reference is the float kernel fed the dequantized activation d * xq
(`UniformTensor.matmul_reference_int8`).

Lanes are outputs: qweight [runs * bits, out] has each word row contiguous
over outputs, and one 32-bit word holds 32/bits codes of one output. For 2, 4
and 8 bits, byte i of word t of a run holds the codes 32t/bits + (8/bits) i + s,
s < 8/bits, at bit offset bits * s of the byte; so `(word >> bits*s) & mask`
(mask = 2**bits - 1 in every byte) is four unsigned codes, one per byte, and
the activations are permuted once per call into the matching byte order
(`xw`: eight 32-bit words per run, one per (t, s)). Then one u8 x s8 dot
product of four bytes per 32-bit lane does four multiply-adds of one output:

- `avx512vnni`: `vpdpbusd` on 16 outputs (llvm.x86.avx512.vpdpbusd.512);
  2, 4 and 8 bits.
- `avx2`: `vpmaddubsw` into int16 pairs, the run summed in int16 lanes, then
  one `vpmaddwd` by ones to int32 on 8 outputs; 2 and 4 bits (a run's int16
  sum is at most 16 * 15 * 127 = 30480; 8-bit codes would saturate).
- `portable`: plain Numba integer code (shift, mask, multiply), which LLVM
  vectorizes on any CPU; every bit width (3 bits: codes 10 and 21 straddle
  two words) and the outputs past the last whole SIMD tile.

Tables. The same kernel runs 4-bit codes that index a 16-value table (NF4 and
FP4, the lut4 format repacked into this layout: runtime/kernels/lut4_numba.py).
One byte per value would round NF4's levels by up to 0.4% of the block's
absmax, the same rounding for every weight of a level, which measured +0.7%
WikiText-2 perplexity on SmolLM2; so a value is held in two bytes,
V[c] = rint(32512 * value[c] / max|value|) + 32768 = 256 hi[c] + lo[c], each
code is looked up in both byte tables in the register (`vpshufb`, 16 bytes
per 128-bit lane) and multiplied by two `vpdpbusd`, summed as 256 hi + lo in
int32 (at most 2^28 per run of 32), with the zero point 32768 taken off;
the group scale carries absmax * max|value| / 32512. Only avx512vnni has
table tiles (`LUT_KERNELS`; avx2's `vpmaddubsw` would saturate).

The x86 paths are written as Numba intrinsics over LLVM vector types and are
compiled to nothing on a CPU without them (ARM), where `available_kernels`
never offers them. Several weights sharing the input (q/k/v, gate/up) go in
one call (`matvec_parts`): x is quantized once. A call's arguments are
gathered once per list of weights (`prepare`) and reused every step (`run`).
Work is split over the input (each task streams a contiguous slice of
qweight); tiny products run on the calling thread, the rest in one parallel
region.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from runtime.formats.lut4 import LUT_ZERO
from runtime.kernels.quant_activations_numba import BLOCK, quantize_blocks
from runtime.kernels.uniform_numba import storage_input
from runtime.kernels.uniform_numba import group_grid, group_runs, kernel_arrays, readonly

KERNELS = ("avx512vnni", "avx2", "portable")
SIMD_BITS = {"avx512vnni": (2, 4, 8), "avx2": (2, 4), "portable": ()}  # bit widths with SIMD tiles
LUT_KERNELS = ("avx512vnni",)  # kernels with SIMD tiles for 4-bit codes through a table (vpshufb)
NO_LUT = np.zeros(0, dtype=np.uint8)  # stands for "codes are the values"
NO_LUT.flags.writeable = False
LANES = {"avx512vnni": 16, "avx2": 8, "portable": 0}  # outputs per SIMD tile
KERNEL_IDS = {"portable": 0, "avx2": 1, "avx512vnni": 2}  # how the matvec is told which tiles to run
WORDS_PER_RUN = 8  # 32-bit activation words per run of 32 (32 int8 values)
MAX_PARTS = 3  # weights one call multiplies (q/k/v)
PARALLEL_BYTES = 32 << 10  # packed codes below which a product runs on the calling thread (`prepare`)

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


@functools.cache
def available_kernels() -> tuple:
    """The kernels the CPU that Numba compiles for supports, fastest first (NUMBA_CPU_NAME set: portable)."""
    if numba.config.CPU_NAME not in (None, "host"):
        return ("portable",)
    features = llvm.get_host_cpu_features()
    needs = {"avx512vnni": ("avx512vnni", "avx512bw"), "avx2": ("avx2",), "portable": ()}
    return tuple(k for k in KERNELS if all(features.get(f) for f in needs[k]))


# ---- the SIMD tiles: LLVM IR for one run of 32 inputs on one tile of outputs -------------------

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


def _tile_intrinsic(bits: int, kernel: str, lut: bool = False):
    """An intrinsic tile(qweight, row0, n, xw, w0, d, facc, f0[, table, offset]) adding, for the L outputs
    n .. n+L-1, d * dot(codes of word rows row0 .. row0+bits-1, activations xw[w0 : w0+8] as int32
    words) into facc[f0 : f0+L] (L = LANES[kernel]; qweight C-contiguous). With `lut` (4 bits,
    avx512vnni) each code stands for the table value 256 * table[code] + table[16 + code] (uint8 [32]:
    high bytes, then low bytes), multiplied as two byte dot products, and the int32 `offset` (the
    table's zero point times the run's sum of activations) is subtracted from the exact integer sum
    before it is scaled: no float cancellation."""
    lanes = LANES[kernel]
    dot = _dot_vnni if kernel == "avx512vnni" else _dot_avx2

    def codegen(context, builder, signature, args):
        if kernel not in available_kernels():  # compiled, never run: Python picks only available kernels
            return context.get_dummy_value()
        qweight, row0, n, xw, w0, d, facc, f0 = args[:8]
        q_array = context.make_array(signature.args[0])(context, builder, qweight)
        x_data = context.make_array(signature.args[3])(context, builder, xw).data
        f_data = context.make_array(signature.args[6])(context, builder, facc).data
        n_cols = cgutils.unpack_tuple(builder, q_array.shape)[1]
        vector = ir.VectorType(_I32, lanes)
        tables = ()
        if lut:  # the high bytes, then the low bytes
            t_data = builder.bitcast(context.make_array(signature.args[8])(context, builder, args[8]).data,
                                     ir.VectorType(_I8, 16).as_pointer())
            tables = tuple(builder.load(builder.gep(t_data, [ir.Constant(_I32, i)]), align=1) for i in (0, 1))
        acc = None
        acc_low = None
        for t in range(bits):
            offset = builder.add(builder.mul(builder.add(row0, ir.Constant(row0.type, t)), n_cols), n)
            word = builder.load(builder.bitcast(builder.gep(q_array.data, [offset]), vector.as_pointer()), align=4)
            for s in range(8 // bits):
                index = builder.add(w0, ir.Constant(w0.type, t * (8 // bits) + s))
                x_ptr = builder.bitcast(builder.gep(x_data, [builder.mul(index, ir.Constant(index.type, 4))]),
                                        _I32.as_pointer())
                codes = _codes(builder, word, bits, s)
                x_word = _splat(builder, builder.load(x_ptr, align=1), lanes)
                if lut:
                    acc_low = dot(builder, acc_low, _lookup_vnni(builder, codes, tables[1]), x_word)
                    codes = _lookup_vnni(builder, codes, tables[0])
                acc = dot(builder, acc, codes, x_word)
        if kernel == "avx2":
            acc = _widen_avx2(builder, acc)
        if lut:  # 256 * high + low, minus the zero point's share
            acc = builder.shl(acc, ir.Constant(vector, [8] * lanes))
            acc = builder.sub(builder.add(acc, acc_low), _splat(builder, args[9], lanes))
        floats = ir.VectorType(_F32, lanes)
        f_ptr = builder.bitcast(builder.gep(f_data, [f0]), floats.as_pointer())
        scaled = builder.fmul(builder.sitofp(acc, floats), _splat(builder, d, lanes))
        builder.store(builder.fadd(builder.load(f_ptr, align=4), scaled), f_ptr, align=4)
        return context.get_dummy_value()

    def typer(typingctx, qweight, row0, n, xw, w0, d, facc, f0):
        return types.void(qweight, types.int64, types.int64, xw, types.int64, types.float32, facc,
                          types.int64), codegen

    def typer_lut(typingctx, qweight, row0, n, xw, w0, d, facc, f0, table, offset):
        return types.void(qweight, types.int64, types.int64, xw, types.int64, types.float32, facc,
                          types.int64, table, types.int32), codegen

    return intrinsic(typer_lut if lut else typer)


_VNNI2, _VNNI4, _VNNI8 = (_tile_intrinsic(b, "avx512vnni") for b in (2, 4, 8))
_VNNI4_LUT = _tile_intrinsic(4, "avx512vnni", lut=True)
_AVX2_2, _AVX2_4 = (_tile_intrinsic(b, "avx2") for b in (2, 4))


@njit(inline="always")
def _tiles_vnni(qweight, run, bits, xw, d, facc, n0, full):
    """facc[i] += d * dot_run[n0 + i] for i < full (a multiple of 16), by vpdpbusd tiles."""
    for i in range(0, full, 16):
        if bits == 4:
            _VNNI4(qweight, run * 4, n0 + i, xw, run * WORDS_PER_RUN, d, facc, i)
        elif bits == 2:
            _VNNI2(qweight, run * 2, n0 + i, xw, run * WORDS_PER_RUN, d, facc, i)
        else:
            _VNNI8(qweight, run * 8, n0 + i, xw, run * WORDS_PER_RUN, d, facc, i)


@njit(inline="always")
def _tiles_vnni_lut(qweight, run, xw, d, facc, n0, full, lut, offset):
    """`_tiles_vnni` for 4-bit codes looked up in lut (uint8 [32], `_tile_intrinsic`), minus offset."""
    for i in range(0, full, 16):
        _VNNI4_LUT(qweight, run * 4, n0 + i, xw, run * WORDS_PER_RUN, d, facc, i, lut, offset)


@njit(inline="always")
def _tiles_avx2(qweight, run, bits, xw, d, facc, n0, full):
    """facc[i] += d * dot_run[n0 + i] for i < full (a multiple of 8), by vpmaddubsw tiles."""
    for i in range(0, full, 8):
        if bits == 4:
            _AVX2_4(qweight, run * 4, n0 + i, xw, run * WORDS_PER_RUN, d, facc, i)
        else:
            _AVX2_2(qweight, run * 2, n0 + i, xw, run * WORDS_PER_RUN, d, facc, i)


# ---- the portable lanes ------------------------------------------------------------------------

@njit(inline="always")
def _lanes_words(qweight, run, bits, xq, d, facc, n0, a, m):
    """facc[i] += d * dot_run[n0 + i] for a <= i < m; bits 2, 4 or 8 (no code straddles words).
    Word by word over the outputs, so LLVM vectorizes across outputs (int32 lanes)."""
    per_word = 32 // bits
    mask = np.int32((1 << bits) - 1)
    dot = np.zeros(m - a, dtype=np.int32)  # [m - a]
    for t in range(bits):
        words = qweight[run * bits + t, n0 + a:n0 + m]  # [m - a]
        for j in range(per_word):
            xj = np.int32(xq[run * BLOCK + t * per_word + j])
            shift = np.int32(j * bits)
            for i in range(m - a):
                dot[i] += ((words[i] >> shift) & mask) * xj
    for i in range(m - a):
        facc[a + i] += d * np.float32(dot[i])


@njit(inline="always")
def _lanes_lut4(qweight, run, xq, d, facc, n0, a, m, lut, offset):
    """`_lanes_words` for 4-bit codes looked up in lut (uint8 [32]: value 256 lut[c] + lut[16 + c]):
    facc[i] += d * (sum value[code] xq - offset)."""
    values = np.empty(16, dtype=np.int32)  # [16]
    for c in range(16):
        values[c] = np.int32(lut[c]) * np.int32(256) + np.int32(lut[16 + c])
    dot = np.zeros(m - a, dtype=np.int32)  # [m - a]
    for t in range(4):
        words = qweight[run * 4 + t, n0 + a:n0 + m]  # [m - a]
        for j in range(8):
            xj = np.int32(xq[run * BLOCK + t * 8 + j])
            shift = np.int32(4 * j)
            for i in range(m - a):
                dot[i] += values[(words[i] >> shift) & np.int32(15)] * xj
    for i in range(m - a):
        facc[a + i] += d * np.float32(dot[i] - offset)


@njit(inline="always")
def _lanes3(qweight, run, xq, d, facc, n0, a, m):
    """`_lanes_words` for 3 bits (codes 10 and 21 straddle two words)."""
    base = run * BLOCK
    words0 = qweight[3 * run, n0 + a:n0 + m]  # [m - a]
    words1 = qweight[3 * run + 1, n0 + a:n0 + m]  # [m - a]
    words2 = qweight[3 * run + 2, n0 + a:n0 + m]  # [m - a]
    seven = np.int32(7)
    dot = np.zeros(m - a, dtype=np.int32)  # [m - a]
    for j in range(10):
        x0, x1, x2 = np.int32(xq[base + j]), np.int32(xq[base + 11 + j]), np.int32(xq[base + 22 + j])
        s0, s1, s2 = np.int32(3 * j), np.int32(3 * j + 1), np.int32(3 * j + 2)
        for i in range(m - a):
            dot[i] += (((words0[i] >> s0) & seven) * x0 + ((words1[i] >> s1) & seven) * x1
                       + ((words2[i] >> s2) & seven) * x2)
    x10, x21 = np.int32(xq[base + 10]), np.int32(xq[base + 21])
    for i in range(m - a):
        code10 = ((words0[i] >> np.int32(30)) & np.int32(3)) | ((words1[i] & np.int32(1)) << np.int32(2))
        code21 = ((words1[i] >> np.int32(31)) & np.int32(1)) | ((words2[i] & np.int32(3)) << np.int32(1))
        facc[a + i] += d * np.float32(dot[i] + code10 * x10 + code21 * x21)


@njit(inline="always")
def _lanes(qweight, run, bits, xq, d, facc, n0, a, m):
    """facc[i] += d * dot_run[n0 + i] for a <= i < m, any bit width, in plain integer code."""
    if bits == 4:
        _lanes_words(qweight, run, 4, xq, d, facc, n0, a, m)
    elif bits == 2:
        _lanes_words(qweight, run, 2, xq, d, facc, n0, a, m)
    elif bits == 8:
        _lanes_words(qweight, run, 8, xq, d, facc, n0, a, m)
    else:
        _lanes3(qweight, run, xq, d, facc, n0, a, m)


# ---- the matvec --------------------------------------------------------------------------------

@njit(cache=True)
def quantize_input(x, perm, bits, n_runs, group_runs, n_groups):
    """(xq [runs*32] int8, xw [runs*32] int8, d [runs] float32, xsum [n_groups] float32) of x [in]:
    x gathered into storage order (perm; empty: identity) and zero-padded to whole runs, quantized
    per run (Q8_0); xw is xq in the byte order of the SIMD tiles (bits 2, 4, 8; bits 3: xq)."""
    xs = storage_input(x, perm, n_runs)  # [runs*32]
    xq = np.empty(n_runs * BLOCK, dtype=np.int8)  # [runs*32]
    d = np.empty(n_runs, dtype=np.float32)  # [runs]
    quantize_blocks(xs, xq, d)
    xsum = np.zeros(n_groups, dtype=np.float32)  # [n_groups]
    for r in range(n_runs):
        total = np.int32(0)
        for k in range(r * BLOCK, (r + 1) * BLOCK):
            total += xq[k]
        xsum[r // group_runs] += d[r] * np.float32(total)
    xw = xq.copy()  # [runs*32]
    if bits != 3:
        per_word = 32 // bits
        sub = 8 // bits  # codes per byte
        for r in range(n_runs):
            for t in range(bits):
                for s in range(sub):
                    for i in range(4):
                        xw[r * BLOCK + 4 * (t * sub + s) + i] = xq[r * BLOCK + t * per_word + sub * i + s]
    return xq, xw, d, xsum


@njit(cache=True, fastmath=True)
def _partial(kernel_id, qweight, qzeros, scales, xq, xw, d, xsum, bits, group_runs, sym, lut, r0, r1, y):
    """y [out] = the share of runs r0 .. r1-1 in W x: SIMD tiles over the whole tiles of outputs,
    portable lanes after; a group's zero-point term goes with its first run. lut (uint8 [32], 4 bits,
    sym; empty: none) replaces each code c by 256 lut[c] + lut[16 + c], whose zero point LUT_ZERO is
    taken off each run's integer dot product (LUT_ZERO * sum of the run's xq) instead."""
    n_out = qweight.shape[1]
    lanes = 16 if kernel_id == 2 else 8  # KERNEL_IDS, LANES
    full = n_out // lanes * lanes if kernel_id > 0 else 0
    width = -(-n_out // BLOCK) * BLOCK
    facc = np.empty(n_out, dtype=np.float32)  # [out] sum_r d_r dot_r over the group's runs in r0 .. r1-1
    s = np.empty(width, dtype=np.float32)  # [out padded to runs of 32]
    z = np.empty(width, dtype=np.float32)  # [out padded]
    y[:] = 0
    for g in range(r0 // group_runs, -(-r1 // group_runs)):
        first = max(r0, g * group_runs)
        facc[:] = 0
        for run in range(first, min(r1, (g + 1) * group_runs)):
            if lut.shape[0] > 0:
                offset = np.int32(0)
                for k in range(run * BLOCK, (run + 1) * BLOCK):
                    offset += np.int32(xq[k])
                offset *= np.int32(LUT_ZERO)
                if kernel_id == 2:
                    _tiles_vnni_lut(qweight, run, xw, d[run], facc, 0, full, lut, offset)
                _lanes_lut4(qweight, run, xq, d[run], facc, 0, full, n_out, lut, offset)
                continue
            if kernel_id == 2:
                _tiles_vnni(qweight, run, bits, xw, d[run], facc, 0, full)
            elif kernel_id == 1:
                _tiles_avx2(qweight, run, bits, xw, d[run], facc, 0, full)
            _lanes(qweight, run, bits, xq, d[run], facc, 0, full, n_out)
        group_grid(qzeros, scales, g, bits, sym, 0, n_out, s, z)
        if lut.shape[0] > 0:
            z[:] = 0  # taken off run by run above
        zero_term = xsum[g] if first == g * group_runs else np.float32(0.0)
        for i in range(n_out):
            y[i] += s[i] * (facc[i] - z[i] * zero_term)


@njit(cache=True)
def _prepare(n_parts, q0, q1, q2, x, perm, bits, group_runs, n_groups, threads):
    """(xq, xw, d, xsum) of `quantize_input`, starts [parts+1] of each part's outputs, tasks per part and
    the partial sums [tasks, sum of outs] of the matvec."""
    qweights = (q0, q1, q2)
    n_runs = q0.shape[0] // bits
    starts = np.zeros(n_parts + 1, dtype=np.int64)  # [parts+1]
    for p in range(n_parts):
        starts[p + 1] = starts[p] + qweights[p].shape[1]
    tasks = min(threads, n_runs)
    partial = np.empty((tasks, starts[-1]), dtype=np.float32)  # [tasks, sum of outs]
    return quantize_input(x, perm, bits, n_runs, group_runs, n_groups), starts, tasks, partial


@njit(inline="always")
def _job(t, tasks, kernel_id, q0, z0, s0, q1, z1, s1, q2, z2, s2, quantized, bits, group_runs, sym, lut, starts,
         partial):
    """Task t of the matvec: runs t*R/tasks .. (t+1)*R/tasks of every part into partial[t] (each task gets
    the same share of every part, so parts of different sizes, q beside k and v, keep the threads even)."""
    xq, xw, d, xsum = quantized
    n_runs = q0.shape[0] // bits
    for p in range(starts.shape[0] - 1):
        _partial(kernel_id, (q0, q1, q2)[p], (z0, z1, z2)[p], (s0, s1, s2)[p], xq, xw, d, xsum, bits, group_runs,
                 sym, lut, t * n_runs // tasks, (t + 1) * n_runs // tasks, partial[t, starts[p]:starts[p + 1]])


@njit(cache=True, parallel=True)
def _matvec_parallel(kernel_id, n_parts, q0, z0, s0, q1, z1, s1, q2, z2, s2, x, perm, bits, group_runs, sym,
                     lut, threads):
    """The prepared call (`prepare`) in one parallel region of `threads` tasks."""
    quantized, starts, tasks, partial = _prepare(n_parts, q0, q1, q2, x, perm, bits, group_runs, s0.shape[0],
                                                 threads)
    for t in prange(tasks):
        _job(t, tasks, kernel_id, q0, z0, s0, q1, z1, s1, q2, z2, s2, quantized, bits, group_runs, sym, lut,
             starts, partial)
    return partial.sum(axis=0)  # [sum of outs]


@njit(cache=True)
def _matvec_serial(kernel_id, n_parts, q0, z0, s0, q1, z1, s1, q2, z2, s2, x, perm, bits, group_runs, sym, lut):
    """The prepared call (`prepare`) on the calling thread alone."""
    quantized, starts, tasks, partial = _prepare(n_parts, q0, q1, q2, x, perm, bits, group_runs, s0.shape[0], 1)
    _job(0, tasks, kernel_id, q0, z0, s0, q1, z1, s1, q2, z2, s2, quantized, bits, group_runs, sym, lut, starts,
         partial)
    return partial[0]  # [sum of outs]


class KernelWeight(NamedTuple):
    """One weight as the matvec takes it: the uniform format's packed layout, SpQR's dense part (the same
    layout with float32 statistics), or a 4-bit layout whose codes index a table (the lut4 format
    repacked, runtime/kernels/lut4_numba.py)."""
    qweight: np.ndarray  # int32 [runs * bits, out], read-only
    qzeros: np.ndarray  # uint32 [groups, ceil(out/32) * bits] codes, or float32 [groups, out] (not read when sym)
    scales: np.ndarray  # [groups, out]: uint16 (float16 bits) or float32
    perm: np.ndarray  # int32 [in] storage order (empty: identity)
    in_features: int
    bits: int
    group_runs: int
    sym: bool
    lut: np.ndarray  # uint8 [32] code c -> 256 lut[c] + lut[16 + c], zero point LUT_ZERO (4 bits); empty: none


def kernel_weight(packed) -> KernelWeight:
    """The KernelWeight of a UniformTensor (a KernelWeight is returned as it is)."""
    if isinstance(packed, KernelWeight):
        return packed
    qweight, qzeros, scales, perm = kernel_arrays(packed)
    return KernelWeight(qweight, qzeros, scales, perm, packed.in_features, packed.bits, group_runs(packed),
                        packed.sym, NO_LUT)


def fusable(parts) -> bool:
    """Whether `matvec_parts` takes these weights (UniformTensor or KernelWeight) in one call: same input,
    grid, storage order and table."""
    weights = [kernel_weight(p) for p in parts]
    first = weights[0]
    grid = (first.in_features, first.bits, first.group_runs, first.sym, first.scales.dtype, first.qzeros.dtype)
    return len(parts) <= MAX_PARTS and all(
        (w.in_features, w.bits, w.group_runs, w.sym, w.scales.dtype, w.qzeros.dtype) == grid and np.array_equal(w.perm, first.perm)
        and np.array_equal(w.lut, first.lut) for w in weights)


class PreparedCall(NamedTuple):
    """`_matvec_serial` / `_matvec_parallel`'s arguments but x, for one list of fusable weights and one kernel:
    built once (`prepare`), run every decode step (`run`)."""
    head: tuple  # kernel_id, n_parts, then qweight, qzeros, scales of each of MAX_PARTS slots
    tail: tuple  # perm, bits, group_runs, sym, lut
    parallel: bool  # at least PARALLEL_BYTES of codes: one parallel region, else the calling thread


def prepare(parts, kernel: str) -> PreparedCall | None:
    """The call computing (W x for W in parts) concatenated with int8 activations, for up to MAX_PARTS
    weights (UniformTensor or KernelWeight) sharing in_features, bits, grid, storage order and table;
    None when they do not (`fusable`). `kernel` one of KERNELS: SIMD tiles where it has them for the
    codes, portable code for the rest.

    Unused slots repeat part 0: arrays as separate arguments go through Numba's fast typing path
    (tuples of them cost ~12 us a call). The work is split over the input: each task streams one
    contiguous slice of each qweight (whole word rows of a range of runs) into its own partial y, and
    the partials are summed at the end. Products of fewer than PARALLEL_BYTES of codes run on the
    calling thread, where a parallel region costs more than it saves.
    """
    if not fusable(parts):
        return None
    weights = [kernel_weight(p) for p in parts]
    first = weights[0]
    simd = simd_tiles(first.bits, kernel, first.lut.shape[0] > 0)
    slots = [w[:3] for w in weights] + [first[:3]] * (MAX_PARTS - len(weights))
    head = (KERNEL_IDS[kernel] if simd else 0, len(weights), *(a for slot in slots for a in slot))
    parallel = sum(w.qweight.nbytes for w in weights) >= PARALLEL_BYTES
    return PreparedCall(head, (first.perm, first.bits, first.group_runs, first.sym, first.lut), parallel)


def run(call: PreparedCall, x: np.ndarray) -> np.ndarray:
    """y [sum of outs] of a prepared call for x [in] float32."""
    if call.parallel and numba.get_num_threads() > 1:
        return _matvec_parallel(*call.head, readonly(x), *call.tail, numba.get_num_threads())
    return _matvec_serial(*call.head, readonly(x), *call.tail)


def matvec_parts(parts, x: np.ndarray, kernel: str) -> np.ndarray:
    """y [sum of outs] = (W x for W in parts) concatenated, x [in] float32, int8 activations (parts
    `fusable`; see `prepare`)."""
    return run(prepare(parts, kernel), x)


def matvec(packed, x: np.ndarray, kernel: str) -> np.ndarray:
    """y [out] = W x for x [in] float32 with int8 activations (`matvec_parts` of one weight)."""
    return matvec_parts([packed], x, kernel)


def simd_tiles(bits: int, kernel: str, lut: bool = False) -> bool:
    """Whether `kernel` has SIMD tiles for `bits` (with a table: only 4 bits on avx512vnni, `LUT_KERNELS`)."""
    return kernel in LUT_KERNELS and bits == 4 if lut else bits in SIMD_BITS[kernel]
