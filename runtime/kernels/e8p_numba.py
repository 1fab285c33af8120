"""Numba CPU kernels of the e8p format (layout: runtime/formats/e8p.py; codebooks: runtime/e8p_codebook.py).

QuIP# (Tseng et al. 2024) inference: y = ((x ⊙ s_in) Hᵢᵀ) Ŵᵀ Hₒ ⊙ s_out.

- `hadamard_rows`: the randomized Hadamard transform of each row (signs, a
  Walsh–Hadamard butterfly per K-block, the dense K×K factor), parallel over rows.
- `matmul_fused` (decode, a few input rows): both transforms around a matvec
  that decodes each 16-bit code on the fly from a 256 × 8 table of source
  vectors times a 128 × 8 table of sign patterns (8 + 4 KiB, cache resident):
  coordinate k ≥ 1 takes the sign of code bit k, coordinate 0 the parity of
  the 7 sign bits (`e8p_codebook.sign_table`; the source table's coordinate 0 already
  carries the source parity, `e8p_codebook.signed_source_table`), and the ±¼ shift
  adds ±¼ Σ x over the group, summed once per call. A 1-bit E8 stage is a
  plain table lookup.
  Parallel over output rows.
- `matmul_prefill` (many rows): Ŵ is decoded tile by tile (about `PREFILL_TILE`
  floats) and multiplied by BLAS, tiles spread over one thread per core
  (runtime/kernels/prefill_threads.py), with the transforms around it.
- `matmul_prefill_vbmi` (many rows, AVX-512 VBMI, at least 512 inputs):
  the rotated rows are quantized to Q8_0 as in decode (one byte: two bytes
  took twice the byte products, and the perplexity cost of one byte is the
  decode path's, +0.13% on SmolLM2), the codes of a span of outputs are
  decoded once (`_chunk_points`, below; `_pass_points`), and a tile of 16
  rows' activations of one chunk (8 KiB) meets the whole span from the first-
  level cache, each activation word loaded meeting PREFILL_OUTPUTS outputs
  held in registers (`_pass_rows_dot`).
- `matmul_int8` (decode on CPUs with AVX-512 VNNI, 2, 3 and 4 bits): the rotated
  activation is quantized to int8 per block of 32 (llama.cpp's Q8_0,
  runtime/kernels/quant_activations_numba.py) and each E8P code becomes eight
  exact bytes: 4·point is an odd integer in [-11, 11], so `byte_table` holds
  4·point + 16 (shift −¼) for each of the 2^15 (source, signs) pairs as one
  uint64 (256 KiB, cache resident) and the +¼ shift adds 2 to every byte.
  Eight codes (64 bytes) then meet 64 int8 activations in one `vpdpbusd`
  (unsigned × signed bytes), the accumulator starting from −16·Σxq of each
  lane's four activations, so the integer sum is exactly 4·Σ point·xq;
  each block's activation scale is applied to its lanes in float.
  Parts sharing an input (q/k/v, gate/up) go in one call (`_decode_int8_parts`):
  their rotations run in parallel instead of one after another on the calling
  thread. With AVX-512 VBMI (`_e8p_rows_dot_vbmi`) whole chunks of 64 codes skip the
  table loads: the codes' source bytes index three 256-byte tables
  (`vpermi2b`, 64 codes per instruction; `packed_coordinate_tables`):
  4·coordinate 0, and two bits for each of coordinates 1-7, whose magnitude
  (1/2, 3/2 or 5/2) a 64-byte table turns into 4·|c| (`vpermb`); the sign
  bits and the parity negate bytes in the register, and one `vpdpbusd` per
  coordinate meets 64 activations stored coordinate by coordinate; lane j of
  the sum is then Q8_0 block j, scaled once per chunk. (Eight 256-byte tables,
  one per coordinate, took all 32 vector registers: the loop of a chunk spent
  57 of its 128 instructions on copies and reloads of spilled tables, 80 in
  all now, and TinyLlama-1.1B's MLP products went 226 -> 184 us.) On
  TinyLlama-1.1B's q/gate/down shapes the VBMI path was 1.85x the table-load
  path before that. The inputs past the last whole chunk (SmolLM2's 576 =
  512 + 64) go eight output rows at a time (`_e8p_tail_rows_vbmi`): each
  row's group of 8 codes gathered into one vector of 64 codes and decoded as
  a chunk, the group's activations broadcast to the eight rows (SmolLM2
  QuIP# decode 13-15% faster than row by row through the byte table, which
  now takes only the rows past the last eight). The 1-bit E8 stage of 3
  bits (uint8 codes, 4·point an integer in [-8, 8], no signs or shift) reads
  its own 256-entry byte table (`one_bit_byte_table`) the same way, and with
  VBMI its own coordinate tables (`one_bit_coordinate_tables`), in decode and
  in the integer prefill (packed as two value indices per table row,
  `packed_one_bit_tables`).
"""
from __future__ import annotations

import functools
import math

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from runtime import e8p_codebook
from runtime.hadamard import hadamard_factor, small_hadamard
from runtime.kernels.numba_common import combine_rows, combines
from runtime.kernels.prefill_threads import run_tiles
from runtime.kernels.quant_activations_numba import BLOCK, quantize_blocks
from runtime.kernels.uniform_int8_numba import available_kernels

SERIAL_MAX_ROWS = 4  # rows up to which the Hadamard transforms run on one thread
PREFILL_TILE = 1 << 20  # floats in the decoded tile of Ŵ in the prefill path (4 MiB)
CODES_PER_DOT = 8  # E8P codes (64 weights) per vpdpbusd of the byte-table path
CHUNK_CODES = 64  # E8P codes (512 weights) per step of the VBMI path: one vpdpbusd per coordinate
PREFILL_OUTPUTS = 3  # output rows of the integer prefill sharing each load of activations (2: 64, 4: 72 tok/s)
TASK_PASSES = 12  # passes of PREFILL_OUTPUTS outputs per parallel task of the integer prefill (TinyLlama-1.1B
#                  QuIP# 4-bit, 128 rows: gate 5632 x 2048 7.3 ms, down 5.4; with 8 passes 7.7 and 6.5)
TILE_ROWS = 16  # rows of activations per tile of the integer prefill: a chunk of them is 8 KiB (`_prefill_vbmi`)
BYTE_ZERO = 16  # `byte_table` holds 4·point + BYTE_ZERO
DECODE_ROWS = 32  # output rows per call of the VBMI decode kernel (per-call setup)


@njit(inline="always")
def _butterfly8(buf, base, size):
    """The Walsh–Hadamard stages of strides 1, 2 and 4 on buf[base : base + size], eight elements at a time."""
    for start in range(base, base + size, 8):
        b0, b1, b2, b3 = buf[start], buf[start + 1], buf[start + 2], buf[start + 3]
        b4, b5, b6, b7 = buf[start + 4], buf[start + 5], buf[start + 6], buf[start + 7]
        s0, d0, s1, d1 = b0 + b1, b0 - b1, b2 + b3, b2 - b3  # stride 1
        s2, d2, s3, d3 = b4 + b5, b4 - b5, b6 + b7, b6 - b7
        t0, t1, t2, t3 = s0 + s1, d0 + d1, s0 - s1, d0 - d1  # stride 2
        t4, t5, t6, t7 = s2 + s3, d2 + d3, s2 - s3, d2 - d3
        buf[start], buf[start + 1], buf[start + 2], buf[start + 3] = t0 + t4, t1 + t5, t2 + t6, t3 + t7  # stride 4
        buf[start + 4], buf[start + 5], buf[start + 6], buf[start + 7] = t0 - t4, t1 - t5, t2 - t6, t3 - t7


@intrinsic
def _butterfly_wide(typingctx, buf, size):
    """The Walsh–Hadamard stages of strides 1, 2, 4 and, where the blocks are `size` >= 16, 8 on all of buf [n]
    float32 (n a multiple of 16) in place, sixteen floats a vector: each stage of stride s adds to every element
    its partner i ^ s, itself negated where bit s of i is set (u - v = partner - element), the same sums in the
    same order as `_butterfly8` and the stage of stride 8."""
    def codegen(context, builder, signature, args):
        floats = ir.VectorType(ir.FloatType(), 16)
        i64 = ir.IntType(64)
        array = context.make_array(signature.args[0])(context, builder, args[0])
        n = cgutils.unpack_tuple(builder, array.shape)[0]
        sixteen = builder.icmp_signed(">=", args[1], ir.Constant(args[1].type, 16))

        def stage(values, stride):
            partners = builder.shuffle_vector(values, values, ir.Constant(ir.VectorType(ir.IntType(32), 16),
                                                                          [i ^ stride for i in range(16)]))
            signs = ir.Constant(floats, [-1.0 if i & stride else 1.0 for i in range(16)])
            return builder.fadd(partners, builder.fmul(values, signs))

        with cgutils.for_range(builder, builder.udiv(n, ir.Constant(i64, 16))) as loop:
            at = builder.bitcast(builder.gep(array.data, [builder.mul(loop.index, ir.Constant(i64, 16))]),
                                 floats.as_pointer())
            values = builder.load(at, align=4)
            for stride in (1, 2, 4):
                values = stage(values, stride)
            builder.store(builder.select(sixteen, stage(values, 8), values), at, align=4)
        return context.get_dummy_value()

    return types.void(buf, types.int64), codegen


@intrinsic
def _fwht_stage(typingctx, src, dst, half):
    """dst = one Walsh–Hadamard stage of stride `half` (16, 32, ...; a power of two) on src [n] float32, n a
    multiple of 2 * half: each pair (u, v) = (src[i], src[i + half]) of a block of 2 * half becomes (u + v, u - v),
    sixteen floats a vector. Numba loops over slices of `half` paid a slice per block (255 blocks for 2048 points:
    5.9 us a row) and over an unknown distance LLVM did not vectorize."""
    def codegen(context, builder, signature, args):
        floats = ir.VectorType(ir.FloatType(), 16)
        i64 = ir.IntType(64)
        src_array, dst_array = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 1))
        n = cgutils.unpack_tuple(builder, src_array.shape)[0]
        stride = args[2]

        def vector_at(array, index):
            return builder.bitcast(builder.gep(array.data, [index]), floats.as_pointer())

        width = builder.mul(stride, ir.Constant(i64, 2))
        with cgutils.for_range(builder, builder.udiv(n, width)) as blocks:
            start = builder.mul(blocks.index, width)
            with cgutils.for_range(builder, builder.udiv(stride, ir.Constant(i64, 16))) as chunks:
                u_at = builder.add(start, builder.mul(chunks.index, ir.Constant(i64, 16)))
                v_at = builder.add(u_at, stride)
                u = builder.load(vector_at(src_array, u_at), align=4)
                v = builder.load(vector_at(src_array, v_at), align=4)
                builder.store(builder.fadd(u, v), vector_at(dst_array, u_at), align=4)
                builder.store(builder.fsub(u, v), vector_at(dst_array, v_at), align=4)
        return context.get_dummy_value()

    return types.void(src, dst, types.int64), codegen


@njit(inline="always")
def _hadamard_row(x, r, sign_before, sign_after, h_k, size, transpose, scale, out):
    """out[r] = ((H or Hᵀ) (x[r] ⊙ sign_before)) * scale ⊙ sign_after, H = h_k ⊗ Sylvester(size)."""
    n = x.shape[1]
    k = h_k.shape[0]
    buf = np.empty(n, dtype=np.float32)  # [n]
    spare = np.empty(n, dtype=np.float32)  # [n] the other buffer of the out-of-place stages
    for i in range(n):
        buf[i] = x[r, i] * sign_before[i]
    half = 1
    if size >= 8 and n % 16 == 0:  # the stages within 16 floats in vectors (blocks of 8: the first three)
        _butterfly_wide(buf, size)
        half = min(size, 16)
    elif size >= 8:  # one block of 8 (n = 8): the first three stages as one 8-point butterfly
        _butterfly8(buf, 0, n)
        half = 8
    while half < size:  # each later stage of every block, from one buffer into the other
        if half >= 16:
            _fwht_stage(buf, spare, half)
        else:  # blocks of 2 or 4 (a K-block smaller than 8)
            for start in range(0, n, 2 * half):
                for i in range(start, start + half):
                    spare[i], spare[i + half] = buf[i] + buf[i + half], buf[i] - buf[i + half]
        buf, spare = spare, buf
        half *= 2
    if k == 1:
        for i in range(n):
            out[r, i] = buf[i] * scale * sign_after[i]
        return
    if combines(k, size):  # the K x K factor by register blocks
        combine_rows(h_k, buf.reshape(k, size), spare.reshape(k, size), transpose)
        for i in range(n):
            out[r, i] = spare[i] * scale * sign_after[i]
        return
    acc = np.zeros(size, dtype=np.float32)  # [2**p] one block of the K x K factor's output
    for a in range(k):
        acc[:] = 0
        for c in range(k):  # summed over c in order for each element; the loop over b vectorizes
            coef = h_k[c, a] if transpose else h_k[a, c]
            for b in range(size):
                acc[b] += coef * buf[c * size + b]
        for b in range(size):
            out[r, a * size + b] = acc[b] * scale * sign_after[a * size + b]


@njit(cache=True, parallel=True)
def _hadamard_rows(x, sign_before, sign_after, h_k, size, transpose, scale, out, threads):
    """`_hadamard_row` for every row of x, the rows in `threads` contiguous ranges in parallel (prefill). Each
    range is one call of the serial function: inlined into this parallel function, the row's slice and
    array steps became nested parallel loops, and 128 rows of 2048 took 7.6 ms on two threads against
    0.44 on one."""
    rows = x.shape[0]
    for t in prange(threads):
        _hadamard_rows_serial(x, t * rows // threads, (t + 1) * rows // threads, sign_before, sign_after, h_k,
                              size, transpose, scale, out)


@njit(cache=True)
def _hadamard_rows_serial(x, r0, r1, sign_before, sign_after, h_k, size, transpose, scale, out):
    """`_hadamard_row` for the rows r0 .. r1-1 of x on this thread (decode: waking the workers costs more)."""
    for r in range(r0, r1):
        _hadamard_row(x, r, sign_before, sign_after, h_k, size, transpose, scale, out)


@njit(cache=True, inline="always")
def _shift(code):
    """The ±¼ shift of an E8P code (bit 0)."""
    return np.float32(0.25) if code & 1 else np.float32(-0.25)


@njit(cache=True)
def _group_sums(x, xsum):
    """xsum[r, g] = Σ x[r, 8g : 8g + 8]: what the ±¼ shift of a code in group g adds, per unit of shift."""
    for r in range(x.shape[0]):
        for g in range(xsum.shape[1]):
            acc = np.float32(0.0)
            for i in range(8):
                acc += x[r, 8 * g + i]
            xsum[r, g] = acc


@njit(cache=True, parallel=True)
def _e8p_stage_matvec(codes, table, signs, scale, x, xsum, y):
    """y[r, o] += scale * Σ_g <decode(codes[o, g]), x[r, 8g : 8g + 8]> for E8P codes (uint16).

    decode(c) = table[c >> 8] ⊙ signs[(c >> 1) & 127] ± ¼ (runtime/e8p_codebook.py `sign_table`): the dot of the
    first term is 8 products with no bit arithmetic between them (about twice as fast here as
    accumulating the parity bit by bit), the shift adds ±¼ xsum[r, g].
    """
    n_out, n_groups = codes.shape
    for o in prange(n_out):
        for r in range(x.shape[0]):
            acc = np.float32(0.0)
            for g in range(n_groups):
                code = np.int32(codes[o, g])
                row = code >> 8
                pattern = (code >> 1) & 127
                base = 8 * g
                dot = np.float32(0.0)
                for i in range(8):
                    dot += table[row, i] * signs[pattern, i] * x[r, base + i]
                acc += dot + _shift(code) * xsum[r, g]
            y[r, o] += scale * acc


@njit(cache=True, parallel=True)
def _table_stage_matvec(codes, table, scale, x, y):
    """y[r, o] += scale * Σ_g <table[codes[o, g]], x[r, 8g : 8g + 8]> for 1-bit E8 codes (uint8)."""
    n_out, n_groups = codes.shape
    for o in prange(n_out):
        for r in range(x.shape[0]):
            acc = np.float32(0.0)
            for g in range(n_groups):
                point = table[codes[o, g]]  # [8]
                for i in range(8):
                    acc += point[i] * x[r, 8 * g + i]
            y[r, o] += scale * acc


@njit(inline="always")
def _e8p_decode_row(codes, table, scale, row0, t, out):
    """out[t, 8g + i] += scale * decode(codes[row0 + t, g])[i] (same products as the NumPy reference)."""
    for g in range(codes.shape[1]):
        code = np.int32(codes[row0 + t, g])
        row = code >> 8
        flips = 0
        for i in range(1, 8):
            bit = (code >> i) & 1
            flips += bit
            out[t, 8 * g + i] += scale * (table[row, i] * np.float32(1 - 2 * bit) + _shift(code))
        out[t, 8 * g] += scale * (table[row, 0] * np.float32(1 - 2 * (flips & 1)) + _shift(code))


@njit(inline="always")
def _table_decode_row(codes, table, scale, row0, t, out):
    """out[t, 8g + i] += scale * table[codes[row0 + t, g], i]."""
    for g in range(codes.shape[1]):
        point = table[codes[row0 + t, g]]  # [8]
        for i in range(8):
            out[t, 8 * g + i] += scale * point[i]


@njit(inline="always")
def _decode_row(codes, table, scale, is_e8p, row0, t, out):
    """One stage's row t of Ŵ[row0:] added into out[t]."""
    if is_e8p:
        _e8p_decode_row(codes, table, scale, row0, t, out)
    else:
        _table_decode_row(codes, table, scale, row0, t, out)


@njit(cache=True, parallel=True)
def _stage_decode(codes, table, scale, is_e8p, row0, out):
    """out[t] += one stage's Ŵ[row0 + t] for t < len(out), in parallel over t."""
    for t in prange(out.shape[0]):
        _decode_row(codes, table, scale, is_e8p, row0, np.int64(t), out)


@njit(cache=True, nogil=True)
def _stage_decode_serial(codes, table, scale, is_e8p, row0, out):
    """`_stage_decode` on the calling thread, without the GIL (prefill_threads.run_tiles)."""
    for t in range(out.shape[0]):
        _decode_row(codes, table, scale, is_e8p, row0, t, out)


@functools.lru_cache(maxsize=None)
def _stage_kinds(bits: int, codebook: str) -> tuple:
    """(table, is_e8p) of each stage of a `bits`-bit tensor of a codebook variant."""
    tables = {"e8p": e8p_codebook.signed_source_table(codebook), "e8_1bit": e8p_codebook.e8_1bit_codebook(codebook)}
    return tuple((tables[stage.name], stage.name == "e8p") for stage in e8p_codebook.stage_codebooks(bits, codebook))


def _stages(packed) -> list:
    """(codes, table, scale, is_e8p) of each stage."""
    kinds = _stage_kinds(packed.bits, packed.codebook)
    return [(codes, table, np.float32(scale), is_e8p)
            for codes, (table, is_e8p), scale in zip(packed.stage_codes, kinds, packed.host_scales)]


def hadamard_rows(x: np.ndarray, n: int, sign_before, sign_after, transpose: bool) -> np.ndarray:
    """[m, n] float32: (x ⊙ sign_before) Hᵀ / sqrt(n) ⊙ sign_after (x H / sqrt(n) with `transpose`)."""
    k, p = hadamard_factor(n)
    out = np.empty((x.shape[0], n), dtype=np.float32)  # [m, n]
    args = (sign_before, sign_after, small_hadamard(k), 1 << p, transpose, np.float32(1.0 / math.sqrt(n)), out)
    x = np.ascontiguousarray(x, dtype=np.float32)  # [m, n]
    if x.shape[0] <= SERIAL_MAX_ROWS:
        _hadamard_rows_serial(x, 0, x.shape[0], *args)
    else:
        _hadamard_rows(x, *args, min(numba.get_num_threads(), x.shape[0]))
    return out


def _transform_in(packed, x):
    ones = np.ones(packed.in_features, dtype=np.float32)  # [in]
    return hadamard_rows(x, packed.in_features, packed.signs_in, ones, False)  # [m, in]


def _transform_out(packed, y):
    ones = np.ones(packed.out_features, dtype=np.float32)  # [out]
    return hadamard_rows(y, packed.out_features, ones, packed.signs_out, True)  # [m, out]


def matmul_fused(packed, x: np.ndarray) -> np.ndarray:
    """y [m, out] = x [m, in] @ W.T, decoding the codes inside the dot products (decode path)."""
    x_rot = _transform_in(packed, x)  # [m, in]
    xsum = np.empty((x.shape[0], packed.in_features // 8), dtype=np.float32)  # [m, in/8]
    _group_sums(x_rot, xsum)
    y_rot = np.zeros((x.shape[0], packed.out_features), dtype=np.float32)  # [m, out]
    for codes, table, scale, is_e8p in _stages(packed):
        if is_e8p:
            _e8p_stage_matvec(codes, table, e8p_codebook.sign_table(), scale, x_rot, xsum, y_rot)
        else:
            _table_stage_matvec(codes, table, scale, x_rot, y_rot)
    return _transform_out(packed, y_rot)  # [m, out]


def decode_rows(packed, row0: int = 0, rows: int | None = None) -> np.ndarray:
    """Ŵ[row0 : row0 + rows] [rows, in] float32, equal to the NumPy reference `packed.decoded()`."""
    rows = packed.out_features - row0 if rows is None else rows
    out = np.zeros((rows, packed.in_features), dtype=np.float32)  # [rows, in]
    for codes, table, scale, is_e8p in _stages(packed):
        _stage_decode(codes, table, scale, is_e8p, row0, out)
    return out


def matmul_prefill(packed, x: np.ndarray) -> np.ndarray:
    """y [m, out] = x [m, in] @ W.T: transform x, multiply by Ŵ decoded tile by tile (BLAS), transform back."""
    n_out, n_in = packed.shape
    x_rot = _transform_in(packed, x)  # [m, in]
    tile_rows = min(max(PREFILL_TILE // n_in, 1), n_out)
    y_rot = np.empty((x.shape[0], n_out), dtype=np.float32)  # [m, out]
    stages = _stages(packed)

    def fill(row0, rows, tile):  # tile [tile_rows, in]
        tile[:rows] = 0.0
        for codes, table, scale, is_e8p in stages:
            _stage_decode_serial(codes, table, scale, is_e8p, row0, tile[:rows])

    def multiply(row0, rows, tile):
        np.matmul(x_rot, tile[:rows].T, out=y_rot[:, row0:row0 + rows])  # [m, rows]

    run_tiles(n_out, tile_rows, (tile_rows, n_in), fill, multiply)
    return _transform_out(packed, y_rot)  # [m, out]


@functools.cache
def _x86_features() -> tuple:
    """The x86 features the e8p kernels may use that Numba's target CPU has (none where NUMBA_CPU_NAME is set)."""
    if "avx512vnni" not in available_kernels():
        return ()
    features = llvm.get_host_cpu_features()
    return tuple(f for f in ("avx512vbmi",) if features.get(f))


@functools.cache
def byte_table(codebook: str = e8p_codebook.DEFAULT_VARIANT) -> np.ndarray:
    """uint64 [2^15]: entry (code >> 1) holds the E8P point (of a codebook variant) of that source and sign
    pattern with the −¼ shift as bytes 4·point + BYTE_ZERO, coordinate i in byte i (little-endian); read-only."""
    signs = e8p_codebook.sign_table()[None, :, :]  # [1, 128, 8]
    points = e8p_codebook.signed_source_table(codebook)[:, None, :] * signs - e8p_codebook.SHIFT  # [256, 128, 8]
    table = np.rint(4 * points + BYTE_ZERO).astype(np.uint8).reshape(-1, 8).view("<u8").reshape(-1)  # [2^15]
    table.flags.writeable = False
    return table


@functools.cache
def one_bit_byte_table(codebook: str = e8p_codebook.DEFAULT_VARIANT) -> np.ndarray:
    """uint64 [256]: entry c holds point c of the 1-bit E8 grid (`e8_1bit_codebook`, 4·point an integer in
    [-8, 8]) as bytes 4·point + BYTE_ZERO, coordinate i in byte i: `byte_table` of the residual stage of
    3 bits, whose uint8 codes carry no signs or shift; read-only."""
    points = e8p_codebook.e8_1bit_codebook(codebook)  # [256, 8]
    table = np.rint(4 * points + BYTE_ZERO).astype(np.uint8).view("<u8").reshape(-1)  # [256]
    table.flags.writeable = False
    return table


@intrinsic
def _e8p_row_dot_vnni(typingctx, codes, o, first, xq, start, d, table):
    """float32 Σ_k Σ_lanes d(lane) · (start[16k + lane] + Σ_4 bytes (4·point + 16) · xq): 4 Σ_i point_i d xq_i
    over row o of codes [out, in/8] (C-contiguous) from chunk `first` of CODES_PER_DOT codes on, xq int8
    [in], start int32 [in/4] (−16 Σ of each lane's four xq), d float32 [in/32]; uint16 E8P codes read
    `byte_table` at code >> 1 and add the shift, uint8 codes of the 1-bit E8 stage read
    `one_bit_byte_table` at the code; compiled to 0 on a CPU without VNNI."""
    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        if "avx512vnni" not in available_kernels():
            return ir.Constant(f32, 0.0)
        i16, i32, i64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
        one_bit = signature.args[0].dtype == types.uint8
        code_type = ir.IntType(8) if one_bit else i16
        c_array = context.make_array(signature.args[0])(context, builder, args[0])
        x_data, s_data, d_data, t_data = (context.make_array(signature.args[i])(context, builder, args[i]).data
                                          for i in (3, 4, 5, 6))
        groups = cgutils.unpack_tuple(builder, c_array.shape)[1]
        words, floats = ir.VectorType(i32, 16), ir.VectorType(f32, 16)
        quads = ir.VectorType(i64, CODES_PER_DOT)
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(words, [words] * 3),
                                             "llvm.x86.avx512.vpdpbusd.512")
        acc = cgutils.alloca_once_value(builder, ir.Constant(floats, None))
        row = builder.gep(c_array.data, [builder.mul(args[1], groups)])
        chunks = builder.sub(builder.udiv(groups, ir.Constant(groups.type, CODES_PER_DOT)), args[2])
        with cgutils.for_range(builder, chunks) as loop:
            k = builder.add(loop.index, args[2])
            c_ptr = builder.gep(row, [builder.mul(k, ir.Constant(k.type, CODES_PER_DOT))])
            codes8 = builder.zext(builder.load(builder.bitcast(c_ptr, ir.VectorType(code_type, CODES_PER_DOT)
                                                               .as_pointer()), align=code_type.width // 8), quads)
            index = codes8 if one_bit else builder.lshr(codes8, ir.Constant(quads, [1] * CODES_PER_DOT))
            points = ir.Constant(quads, ir.Undefined)
            for j in range(CODES_PER_DOT):
                entry = builder.gep(t_data, [builder.extract_element(index, ir.Constant(i32, j))])
                points = builder.insert_element(points, builder.load(entry, align=8), ir.Constant(i32, j))
            if not one_bit:  # the +¼ shift: 2 more in every byte
                shift = builder.and_(codes8, ir.Constant(quads, [1] * CODES_PER_DOT))
                points = builder.add(points, builder.mul(shift, ir.Constant(quads, [0x0202020202020202] *
                                                                                CODES_PER_DOT)))
            offset = builder.mul(k, ir.Constant(k.type, 64))
            x = builder.load(builder.bitcast(builder.gep(x_data, [offset]), words.as_pointer()), align=1)
            lane0 = builder.mul(k, ir.Constant(k.type, 16))
            begin = builder.load(builder.bitcast(builder.gep(s_data, [lane0]), words.as_pointer()), align=4)
            total = builder.call(dot, [begin, builder.bitcast(points, words), x])
            d_pair = builder.load(builder.bitcast(builder.gep(d_data, [builder.mul(k, ir.Constant(k.type, 2))]),
                                                  ir.VectorType(f32, 2).as_pointer()), align=4)
            scales = builder.shuffle_vector(d_pair, ir.Constant(d_pair.type, ir.Undefined),
                                            ir.Constant(ir.VectorType(i32, 16), [0] * 8 + [1] * 8))
            builder.store(builder.fadd(builder.load(acc), builder.fmul(builder.sitofp(total, floats), scales)), acc)
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, floats]),
                                                "llvm.vector.reduce.fadd.v16f32")
        return builder.call(reduce, [ir.Constant(f32, 0.0), builder.load(acc)], fastmath=("reassoc",))  # a tree

    return types.float32(codes, types.int64, types.int64, xq, start, d, table), codegen


@functools.cache
def coordinate_tables(codebook: str = e8p_codebook.DEFAULT_VARIANT) -> np.ndarray:
    """int8 [8, 256]: row i = 4 · coordinate i of every `signed_source_table` entry of a codebook variant (even
    integers in [-10, 10]), the byte tables `_e8p_rows_dot_vbmi` looks sources up in; read-only."""
    table = np.ascontiguousarray(np.rint(4 * e8p_codebook.signed_source_table(codebook).T), dtype=np.int8)  # [8, 256]
    table.flags.writeable = False
    return table


@functools.cache
def one_bit_coordinate_tables(codebook: str = e8p_codebook.DEFAULT_VARIANT) -> np.ndarray:
    """int8 [8, 256]: row i = byte i of every `one_bit_byte_table` entry (4 · coordinate i + BYTE_ZERO of each
    point of the 1-bit E8 grid, integers in [8, 24]): `coordinate_tables` of 3 bits' residual stage, whose
    codes carry no signs or shift; read-only."""
    entries = one_bit_byte_table(codebook).view(np.uint8).reshape(-1, 8)  # [256, 8]
    table = np.ascontiguousarray(entries.T).view(np.int8)  # [8, 256]
    table.flags.writeable = False
    return table


def _field_tables(index: np.ndarray, width: int, values: np.ndarray) -> np.ndarray:
    """int64 [rows + 1, 256]: index [n, 256] (each < 2**width) packed per_byte = 8 // width fields a byte, field
    c at bit width * (c % per_byte) of row c // per_byte; then a row whose first 64 bytes turn a byte's low
    `width` bits into their value (byte j = values[j % 2**width], zero past `values`: `vpermb` reads six bits),
    the rest zero."""
    per_byte = 8 // width
    table = np.zeros((-(-index.shape[0] // per_byte) + 1, 256), dtype=np.int64)  # [rows + 1, 256]
    for c in range(index.shape[0]):
        table[c // per_byte] |= index[c] << (width * (c % per_byte))
    table[-1, :64] = np.pad(values, (0, (1 << width) - values.shape[0]))[np.arange(64) % (1 << width)]
    return table


def _read_only_bytes(table: np.ndarray) -> np.ndarray:
    """table's values as a read-only C-contiguous int8 array (bytes the kernels load as vectors)."""
    packed = np.ascontiguousarray(table.astype(np.uint8).view(np.int8))
    packed.flags.writeable = False
    return packed


@functools.cache
def packed_coordinate_tables(codebook: str = e8p_codebook.DEFAULT_VARIANT) -> np.ndarray:
    """int8 [4, 256], what `_chunk_points` looks E8P sources up in (13 vectors of 64 bytes, where
    `coordinate_tables` takes 32 and the kernels then spilled them): row 0 = 4 · coordinate 0 of every
    `signed_source_table` entry (signed); coordinates 1-7 are ±1/2, ±3/2 or ±5/2 (4·|c| = 2, 6, 10: code
    (4·|c| - 2) / 4 in 0..2), two bits each, coordinates 1-4 in row 1 (coordinate c at bits 2(c - 1)) and 5-7
    in row 2 (bits 2(c - 5)); row 3's first 64 bytes turn such a code, in the low two bits of a byte, into
    4·|c| (`_field_tables`); read-only."""
    coordinates = coordinate_tables(codebook).astype(np.int64)  # [8, 256]
    codes = (np.abs(coordinates[1:]) - 2) // 4  # [7, 256] in 0..2
    if not np.array_equal(2 + 4 * codes, np.abs(coordinates[1:])):
        raise ValueError(f"e8p codebook {codebook}: coordinates 1-7 are not all ±1/2, ±3/2, ±5/2")
    fields = _field_tables(codes, 2, np.array([2, 6, 10]))  # [3, 256]
    return _read_only_bytes(np.concatenate([coordinates[:1], fields]))  # [4, 256]


@functools.cache
def packed_one_bit_tables(codebook: str = e8p_codebook.DEFAULT_VARIANT) -> np.ndarray:
    """int8 [5, 256], what `_one_bit_chunk_points` looks 1-bit E8 codes up in (17 vectors of 64 bytes, where
    `one_bit_coordinate_tables` takes 32): each coordinate of a code is one of at most 8 values (4 · coordinate
    + BYTE_ZERO), three bits of its index there; coordinates 2r and 2r + 1 in row r (bits 0-2 and 3-5); row 4's
    first 64 bytes turn such an index, in the low three bits of a byte, into its value (`_field_tables`);
    read-only."""
    coordinates = one_bit_coordinate_tables(codebook).astype(np.int64)  # [8, 256]
    values = np.unique(coordinates)  # [<= 8]
    if values.shape[0] > 8:
        raise ValueError(f"e8p codebook {codebook}: the 1-bit E8 coordinates take more than 8 values")
    return _read_only_bytes(_field_tables(np.searchsorted(values, coordinates), 3, values))  # [5, 256]


def _permute_bytes(builder, a, b, index):
    """<64 x i8>: byte j = (a ++ b)[index[j] & 127] (vpermi2b: AVX-512 VBMI)."""
    bytes64 = ir.VectorType(ir.IntType(8), 64)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(bytes64, [bytes64] * 3),
                                        "llvm.x86.avx512.vpermi2var.qi.512")
    return builder.call(fn, [a, index, b])


def _load_tables(builder, t_data, count):
    """The first `count` <64 x i8> vectors of a kernel's tables (t_data: their data pointer; `_points_of`),
    loaded once where a kernel starts: loads inside its loops were repeated after every store to an output,
    which LLVM cannot prove does not alias the tables."""
    t_vectors = builder.bitcast(t_data, ir.VectorType(ir.IntType(8), 64).as_pointer())
    return [builder.load(builder.gep(t_vectors, [ir.Constant(ir.IntType(32), q)]), align=1) for q in range(count)]


def _field_value(builder, values, fields, shift):
    """<64 x i8>: byte j = values[(fields[j] >> shift) & 63] (`_field_tables`): a 16-bit shift, so bits of the
    neighbouring byte move in above the field, where the value table does not look; then vpermb (AVX-512 VBMI)."""
    if shift:
        words16 = ir.VectorType(ir.IntType(16), 32)
        shifted = builder.lshr(builder.bitcast(fields, words16), ir.Constant(words16, [shift] * 32))
        fields = builder.bitcast(shifted, fields.type)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(values.type, [values.type] * 2),
                                        "llvm.x86.avx512.permvar.qi.512")
    return builder.call(fn, [values, fields])


def _chunk_points(builder, row, k, tables):
    """Eight <64 x i8>: for coordinate i, 4·point_i + BYTE_ZERO (unsigned bytes) of the 64 codes of chunk k of
    a row of codes (row: <64 x i8>* to its first code, two vectors per chunk; tables: `_load_tables` of
    `coordinate_tables`, four vectors per coordinate). The codes split into sign bytes and source bytes
    (vpermi2b), each source looked up in the coordinate's 256-byte table (two vpermi2b of 128 bytes and a
    select), negated by its sign bit (coordinate 0: the parity of the 7 sign bits), shifted by ∓1."""
    i8 = ir.IntType(8)
    bytes64 = ir.VectorType(i8, 64)
    ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(bytes64, [bytes64]), "llvm.ctpop.v64i8")

    def splat(value):
        return ir.Constant(bytes64, [value] * 64)

    even, odd = ir.Constant(bytes64, [2 * j for j in range(64)]), ir.Constant(bytes64, [2 * j + 1 for j in range(64)])
    halves = [builder.load(builder.gep(row, [builder.add(builder.mul(k, ir.Constant(k.type, 2)),
                                                          ir.Constant(k.type, h))]), align=2) for h in (0, 1)]
    signs = _permute_bytes(builder, halves[0], halves[1], even)  # [64] low bytes: shift, sign bits
    sources = _permute_bytes(builder, halves[0], halves[1], odd)  # [64] high bytes: source index
    upper = builder.icmp_signed("<", sources, splat(0))  # source >= 128
    parity = builder.and_(builder.call(ctpop, [builder.and_(signs, splat(0xFE))]), splat(1))
    adjust = builder.add(builder.shl(builder.and_(signs, splat(1)), splat(1)), splat(BYTE_ZERO - 1))
    rows = [_lookup_coordinate(builder, tables, row, sources, upper) for row in range(3)]  # coordinate 0, codes
    points = []
    for i in range(8):
        if i == 0:
            value = rows[0]
        else:  # the two code bits of coordinate i in row 1 or 2
            value = _field_value(builder, tables[12], rows[1 + (i - 1) // 4], 2 * ((i - 1) % 4))
        bit = parity if i == 0 else builder.and_(signs, splat(1 << i))
        value = builder.select(builder.icmp_unsigned("!=", bit, splat(0)), builder.sub(splat(0), value), value)
        points.append(builder.add(value, adjust))
    return points


def _lookup_coordinate(builder, tables, i, index, upper):
    """<64 x i8>: byte j = row i of 256-byte tables [index[j]] (tables: `_load_tables`, four vectors of 64 bytes per
    row; upper: index[j] >= 128), by two vpermi2b of 128 bytes and a select."""
    quarter = tables[4 * i:4 * i + 4]
    return builder.select(upper, _permute_bytes(builder, quarter[2], quarter[3], index),
                          _permute_bytes(builder, quarter[0], quarter[1], index))


def _one_bit_chunk_points(builder, row, k, tables):
    """`_chunk_points` for the uint8 codes of a 1-bit E8 stage (row: <64 x i8>* to the row's first code, one
    vector per chunk; tables: `_load_tables` of `packed_one_bit_tables`, BYTE_ZERO included): each code looked
    up in four 256-byte tables of two coordinates' value indices, each index turned into its value (`vpermb`);
    no signs or shift."""
    codes = builder.load(builder.gep(row, [k]), align=1)
    upper = builder.icmp_signed("<", codes, ir.Constant(codes.type, [0] * 64))  # code >= 128
    rows = [_lookup_coordinate(builder, tables, r, codes, upper) for r in range(4)]
    return [_field_value(builder, tables[16], rows[i // 2], 3 * (i % 2)) for i in range(8)]


def _points_of(signature_codes):
    """(chunk decoder, vectors of 64 bytes its tables take) of a codes array type: E8P (uint16,
    `packed_coordinate_tables`) or the 1-bit E8 stage (uint8, `packed_one_bit_tables`)."""
    return (_one_bit_chunk_points, 17) if signature_codes.dtype == types.uint8 else (_chunk_points, 13)


@intrinsic
def _e8p_rows_dot_vbmi(typingctx, codes, o, rows, xperm, start16, d, tables, scale, out):
    """out[j] += scale · 4 Σ_i point_i d xq_i over the whole chunks of CHUNK_CODES codes of row o + j of codes
    [out, in/8] uint16 (C-contiguous), for j < rows (out float32 [rows], contiguous): the chunk's 64 codes
    split into source bytes and sign bytes (vpermi2b), then for each coordinate i the 64 sources looked up
    in tables[i] (`coordinate_tables`, two vpermi2b of 128 bytes), negated by their sign bit (coordinate 0:
    the parity of the 7 sign bits), shifted by ∓1 and made unsigned (+16) and multiplied by the 64
    activations of that coordinate, xperm[512 k + 64 i + c] = xq[512 k + 8 c + i] (`vpdpbusd`). Lane j of
    the sum then covers exactly Q8_0 block j of the chunk, so it starts from start16 (−16 Σ of the block's
    xq) and is scaled by d once per chunk. A block of rows per call: the 32 table vectors are loaded (and
    spilled, being all the registers there are) once per call, which per row cost more than a chunk of
    512 inputs. Compiled to nothing on a CPU without AVX-512 VBMI and VNNI. uint8 codes of a 1-bit E8
    stage are looked up in `one_bit_coordinate_tables` (`_one_bit_chunk_points`)."""
    def codegen(context, builder, signature, args):
        if "avx512vbmi" not in _x86_features():
            return context.get_dummy_value()
        f32 = ir.FloatType()
        chunk_points, table_vectors = _points_of(signature.args[0])
        i8, i32 = ir.IntType(8), ir.IntType(32)
        bytes64, words, floats = ir.VectorType(i8, 64), ir.VectorType(i32, 16), ir.VectorType(f32, 16)
        c_array = context.make_array(signature.args[0])(context, builder, args[0])
        x_data, s_data, d_data, t_data, out_data = (
            context.make_array(signature.args[i])(context, builder, args[i]).data for i in (3, 4, 5, 6, 8))
        tables = _load_tables(builder, t_data, table_vectors)
        groups = cgutils.unpack_tuple(builder, c_array.shape)[1]
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(words, [words] * 3),
                                             "llvm.x86.avx512.vpdpbusd.512")
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, floats]),
                                                "llvm.vector.reduce.fadd.v16f32")
        acc = cgutils.alloca_once_value(builder, ir.Constant(floats, None))
        chunks = builder.udiv(groups, ir.Constant(groups.type, CHUNK_CODES))
        with cgutils.for_range(builder, args[2]) as row_loop:
            j = row_loop.index
            row_index = builder.add(args[1], j)
            row = builder.bitcast(builder.gep(c_array.data, [builder.mul(row_index, groups)]), bytes64.as_pointer())
            builder.store(ir.Constant(floats, None), acc)
            with cgutils.for_range(builder, chunks) as loop:
                k = loop.index
                lanes = builder.load(builder.bitcast(builder.gep(s_data, [builder.mul(k, ir.Constant(k.type, 16))]),
                                                     words.as_pointer()), align=4)
                x_chunk = builder.bitcast(builder.gep(x_data, [builder.mul(k, ir.Constant(k.type, 64 * 8))]),
                                          words.as_pointer())
                for i, points in enumerate(chunk_points(builder, row, k, tables)):
                    x_words = builder.load(builder.gep(x_chunk, [ir.Constant(i32, i)]), align=1)
                    lanes = builder.call(dot, [lanes, builder.bitcast(points, words), x_words])
                scales = builder.load(builder.bitcast(builder.gep(d_data, [builder.mul(k, ir.Constant(k.type, 16))]),
                                                      floats.as_pointer()), align=4)
                builder.store(builder.fadd(builder.load(acc), builder.fmul(builder.sitofp(lanes, floats), scales)),
                              acc)
            total = builder.call(reduce, [ir.Constant(f32, 0.0), builder.load(acc)], fastmath=("reassoc",))  # a tree
            target = builder.gep(out_data, [j])
            builder.store(builder.fadd(builder.load(target), builder.fmul(args[7], total)), target)
        return context.get_dummy_value()

    return types.void(codes, types.int64, types.int64, xperm, start16, d, tables, types.float32, out), codegen


@intrinsic
def _e8p_tail_rows_vbmi(typingctx, codes, o, rows, first, xperm, start16, d, tables, scale, out):
    """out[j] += scale · 4 Σ_i point_i d xq_i over the groups of CODES_PER_DOT codes from group `first` on (the
    inputs past the last whole chunk, SmolLM2's 576 = 512 + 64) of row o + j of codes [out, in/8], for
    j < rows (a multiple of 8; out float32 [rows], contiguous). Eight rows at a time: their 8 codes of one
    group are gathered into one vector of 64 codes and decoded in registers as a chunk is (`_points_of`);
    for coordinate i the group's 8 activations of that coordinate, xperm[64 g + 8 i + c] = xq[64 g + 8 c + i]
    (`_chunk_order`), broadcast to the eight rows, meet them in one `vpdpbusd`. Lanes 2j and 2j + 1 of the
    sum are then row j's two Q8_0 blocks of the group: each starts from start16 of its block and is scaled by
    its d. The byte-table path (`_e8p_row_dot_vnni`) did this row by row with eight table loads per group.
    Compiled to nothing without AVX-512 VBMI."""
    def codegen(context, builder, signature, args):
        if "avx512vbmi" not in _x86_features():
            return context.get_dummy_value()
        chunk_points, table_vectors = _points_of(signature.args[0])
        code_type = ir.IntType(8 if signature.args[0].dtype == types.uint8 else 16)
        f32, i8, i32, i64 = ir.FloatType(), ir.IntType(8), ir.IntType(32), ir.IntType(64)
        bytes64, words, floats = ir.VectorType(i8, 64), ir.VectorType(i32, 16), ir.VectorType(f32, 16)
        eight_floats, eight_words, quads = ir.VectorType(f32, 8), ir.VectorType(i32, 8), ir.VectorType(i64, 8)
        group_codes = ir.VectorType(code_type, CODES_PER_DOT)  # one row's codes of one group
        c_array = context.make_array(signature.args[0])(context, builder, args[0])
        x_data, s_data, d_data, t_data, out_data = (
            context.make_array(signature.args[i])(context, builder, args[i]).data for i in (4, 5, 6, 7, 9))
        tables = _load_tables(builder, t_data, table_vectors)
        groups = builder.udiv(cgutils.unpack_tuple(builder, c_array.shape)[1], ir.Constant(i64, CODES_PER_DOT))
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(words, [words] * 3),
                                             "llvm.x86.avx512.vpdpbusd.512")
        gathered = cgutils.alloca_once(builder, ir.ArrayType(group_codes, 8))  # 8 rows x 8 codes
        acc = cgutils.alloca_once_value(builder, ir.Constant(floats, None))
        pairs = ir.Constant(words, [lane % 2 for lane in range(16)])  # lane 2j + b: block b of the group

        def spread(pointer, vector_type):  # the group's two block values, one per lane (lane 2j + b: value b)
            pair = builder.load(builder.bitcast(pointer, vector_type.as_pointer()), align=4)
            return builder.shuffle_vector(pair, pair, pairs)

        with cgutils.for_range(builder, builder.udiv(args[2], ir.Constant(i64, 8))) as block_loop:
            first_row = builder.add(args[1], builder.mul(block_loop.index, ir.Constant(i64, 8)))
            builder.store(ir.Constant(floats, None), acc)
            with cgutils.for_range(builder, builder.sub(groups, args[3])) as loop:
                g = builder.add(loop.index, args[3])
                for j in range(8):
                    offset = builder.add(builder.mul(builder.add(first_row, ir.Constant(i64, j)), groups), g)
                    source = builder.gep(c_array.data, [builder.mul(offset, ir.Constant(i64, CODES_PER_DOT))])
                    row_codes = builder.load(builder.bitcast(source, group_codes.as_pointer()),
                                             align=code_type.width // 8)
                    builder.store(row_codes, builder.gep(gathered, [ir.Constant(i32, 0), ir.Constant(i32, j)]))
                points = chunk_points(builder, builder.bitcast(gathered, bytes64.as_pointer()), ir.Constant(i64, 0),
                                      tables)
                blocks = builder.mul(g, ir.Constant(i64, 2))  # the group's first Q8_0 block
                lanes = spread(builder.gep(s_data, [blocks]), ir.VectorType(i32, 2))
                x_group = builder.bitcast(builder.gep(x_data, [builder.mul(g, ir.Constant(i64, 64))]),
                                          i64.as_pointer())
                for i, coordinate in enumerate(points):
                    x8 = builder.load(builder.gep(x_group, [ir.Constant(i32, i)]), align=1)  # 8 activations
                    x_words = builder.insert_element(ir.Constant(quads, ir.Undefined), x8, ir.Constant(i32, 0))
                    x_words = builder.shuffle_vector(x_words, x_words, ir.Constant(eight_words, [0] * 8))
                    lanes = builder.call(dot, [lanes, builder.bitcast(coordinate, words),
                                               builder.bitcast(x_words, words)])
                scales = spread(builder.gep(d_data, [blocks]), ir.VectorType(f32, 2))
                builder.store(builder.fadd(builder.load(acc), builder.fmul(builder.sitofp(lanes, floats), scales)),
                              acc)
            total = builder.load(acc)
            block_0, block_1 = (builder.shuffle_vector(total, total, ir.Constant(eight_words, list(range(b, 16, 2))))
                                for b in (0, 1))  # [8] each: every row's first and second block
            row_sums = builder.fadd(block_0, block_1)  # [8]
            scale = builder.insert_element(ir.Constant(eight_floats, ir.Undefined), args[8], ir.Constant(i32, 0))
            scale = builder.shuffle_vector(scale, scale, ir.Constant(eight_words, [0] * 8))
            target = builder.bitcast(builder.gep(out_data, [builder.mul(block_loop.index, ir.Constant(i64, 8))]),
                                     eight_floats.as_pointer())
            builder.store(builder.fadd(builder.load(target, align=4), builder.fmul(scale, row_sums)), target,
                          align=4)
        return context.get_dummy_value()

    return types.void(codes, types.int64, types.int64, types.int64, xperm, start16, d, tables, types.float32,
                      out), codegen


@intrinsic
def _pass_points(typingctx, codes, o, tables, points):
    """points[k, 8 j + i] = the 64 bytes 4·point_i + BYTE_ZERO of chunk k (whole chunks of CHUNK_CODES codes) of row
    o + j of codes [out, in/8] (j < PREFILL_OUTPUTS; o + j past the last row: row o again), points uint8
    [chunks, PREFILL_OUTPUTS * 8, 64] C-contiguous: one pass's outputs decoded once (`_chunk_points`; uint8 codes
    of a 1-bit E8 stage: `_one_bit_chunk_points` with its tables) for every tile of rows that meets them
    (`_pass_rows_dot`). Compiled to nothing without VBMI."""
    def codegen(context, builder, signature, args):
        if "avx512vbmi" not in _x86_features():
            return context.get_dummy_value()
        chunk_points, table_vectors = _points_of(signature.args[0])
        bytes64 = ir.VectorType(ir.IntType(8), 64)
        codes_array, points_array = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 3))
        n_out, groups = cgutils.unpack_tuple(builder, codes_array.shape)
        tables = _load_tables(builder, context.make_array(signature.args[2])(context, builder, args[2]).data,
                              table_vectors)
        out = builder.bitcast(points_array.data, bytes64.as_pointer())
        code_rows = []
        for j in range(PREFILL_OUTPUTS):
            row_index = builder.add(args[1], ir.Constant(args[1].type, j))
            row_index = builder.select(builder.icmp_signed("<", row_index, n_out), row_index, args[1])
            code_rows.append(builder.bitcast(builder.gep(codes_array.data, [builder.mul(row_index, groups)]),
                                             bytes64.as_pointer()))
        with cgutils.for_range(builder, builder.udiv(groups, ir.Constant(groups.type, CHUNK_CODES))) as chunks:
            k = chunks.index
            first = builder.mul(k, ir.Constant(k.type, PREFILL_OUTPUTS * 8))
            for j, code_row in enumerate(code_rows):
                for i, point in enumerate(chunk_points(builder, code_row, k, tables)):
                    at = builder.gep(out, [builder.add(first, ir.Constant(k.type, 8 * j + i))])
                    builder.store(point, at, align=1)
        return context.get_dummy_value()

    return types.void(codes, types.int64, tables, points), codegen


@intrinsic
def _pass_rows_dot(typingctx, points, k, xq, start, d, r0, r1, acc):
    """acc[j, r - r0, lane] += d[r, 16 k + lane] times lane `lane` of 4 Σ point · q over chunk k, for the
    PREFILL_OUTPUTS outputs j of one pass (points: `_pass_points`) and the rows r0 <= r < r1 of one-byte
    activations q (xq: int8 [m, chunks * 512], coordinate by coordinate as `_quantize_rotated`'s xperm;
    start: int32 [m, chunks * 16], −BYTE_ZERO times each block's sum of q; d [m, in/32] with the stage's
    scale; acc float32 [PREFILL_OUTPUTS, rows of a tile, 16]). The pass's 24 point vectors are loaded once
    and every activation word loaded meets all PREFILL_OUTPUTS outputs (`vpdpbusd`)."""
    def codegen(context, builder, signature, args):
        if "avx512vbmi" not in _x86_features():
            return context.get_dummy_value()
        i8, i32 = ir.IntType(8), ir.IntType(32)
        words, floats = ir.VectorType(i32, 16), ir.VectorType(ir.FloatType(), 16)
        arrays = {i: context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 3, 4, 7)}
        k, r0, r1 = args[1], args[5], args[6]
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(words, [words] * 3),
                                             "llvm.x86.avx512.vpdpbusd.512")
        point_vectors = builder.bitcast(arrays[0].data, words.as_pointer())
        first = builder.mul(k, ir.Constant(k.type, PREFILL_OUTPUTS * 8))
        points = [[builder.load(builder.gep(point_vectors, [builder.add(first, ir.Constant(k.type, 8 * j + i))]),
                                align=1) for i in range(8)] for j in range(PREFILL_OUTPUTS)]
        lane0 = builder.mul(k, ir.Constant(k.type, 16))

        def at(i, index, offset):  # i8* to element `offset` of row `index` (axis 0, then 1 for 3-D) of argument i
            strides = cgutils.unpack_tuple(builder, arrays[i].strides)
            item = context.get_abi_sizeof(context.get_data_type(signature.args[i].dtype))
            base = builder.bitcast(arrays[i].data, i8.as_pointer())
            position = builder.mul(offset, ir.Constant(offset.type, item))
            for axis, value in enumerate(index):
                position = builder.add(position, builder.mul(value, strides[axis]))
            return builder.gep(base, [position])

        with cgutils.for_range_slice(builder, r0, r1, ir.Constant(r0.type, 1)) as (r, _):
            start = builder.load(builder.bitcast(at(3, [r], lane0), words.as_pointer()), align=4)
            lanes = [start] * PREFILL_OUTPUTS
            x_chunk = builder.bitcast(at(2, [r], builder.mul(k, ir.Constant(k.type, 512))), words.as_pointer())
            for i in range(8):
                x_words = builder.load(builder.gep(x_chunk, [ir.Constant(i32, i)]), align=1)
                lanes = [builder.call(dot, [lanes[j], points[j][i], x_words]) for j in range(PREFILL_OUTPUTS)]
            scales = builder.load(builder.bitcast(at(4, [r], lane0), floats.as_pointer()), align=4)
            for j in range(PREFILL_OUTPUTS):
                out = builder.bitcast(at(7, [ir.Constant(r.type, j), builder.sub(r, r0)], ir.Constant(k.type, 0)),
                                      floats.as_pointer())
                product = builder.fmul(builder.sitofp(lanes[j], floats), scales, flags=("contract",))
                builder.store(builder.fadd(builder.load(out, align=4), product, flags=("contract",)), out, align=4)
        return context.get_dummy_value()

    return types.void(points, types.int64, xq, start, d, types.int64, types.int64, acc), codegen


@njit(cache=True, parallel=True)
def _quantize_rotated_rows(x_rot):
    """(xq [m, chunks * 512] int8 coordinate by coordinate, start [m, chunks * 16] int32, d [m, in/32] float32,
    tail [m, in - chunks * 512] float32) of the Q8_0 activations of rotated rows x_rot [m, in]: the whole
    chunks of CHUNK_CODES codes as `_pass_rows_dot` reads them, the inputs past them dequantized (q·d, for a
    float product); rows in parallel."""
    m, n = x_rot.shape
    chunk = CHUNK_CODES * 8
    whole = n // chunk * chunk
    xq = np.empty((m, whole), dtype=np.int8)  # [m, whole]
    start = np.empty((m, whole // BLOCK), dtype=np.int32)  # [m, whole/32]
    d = np.empty((m, n // BLOCK), dtype=np.float32)  # [m, in/32]
    tail = np.empty((m, n - whole), dtype=np.float32)  # [m, in - whole]
    for r in prange(m):
        q = np.empty(n, dtype=np.int8)  # [in]
        quantize_blocks(x_rot[r], q, d[r])
        for i in range(whole, n):
            tail[r, i - whole] = np.float32(q[i]) * d[r, i // BLOCK]
        _chunk_order(q, xq[r], start[r])
    return xq, start, d, tail


def _lane_sum_masks(lanes: int) -> list:
    """(low, high) shuffle masks of each level of `_lane_sums`' tree over `lanes` vectors of `lanes` floats: at
    the level of segments of s lanes, each segment of both vectors (a ++ b, b's lanes from `lanes` on) gives its
    first s/2 lanes to low and its last s/2 to high, a's segment then b's, so low + high holds the segments of
    s/2 lanes of both."""
    levels, s = [], lanes
    while s > 1:
        low, high = [], []
        for q in range(lanes // s):
            for half, mask in ((0, low), (s // 2, high)):
                mask += [q * s + half + i for i in range(s // 2)] + [lanes + q * s + half + i for i in range(s // 2)]
        levels.append((low, high))
        s //= 2
    return levels


def _bit_reversed(i: int, bits: int) -> int:
    return int(format(i, f"0{bits}b")[::-1], 2)


@intrinsic
def _lane_sums(typingctx, acc, out):
    """out[j, r] = Σ_lane acc[j, r, lane] for acc float32 [J, R, 16] and out [J, R] (C-contiguous, R a multiple
    of 16), sixteen rows at a time: their vectors summed pairwise in a tree of shuffles (`_lane_sum_masks`: 15
    adds and 30 shuffles for 16 rows, where summing each row alone takes 4 shuffle-add steps and an extract)
    into one vector of the 16 rows' sums. The tree leaves row i at lane bit-reversed(i), so the rows go in
    bit-reversed order and come out in order. (`acc[j, r].sum()` row by row took a third of a TinyLlama-1.1B
    QuIP# 4-bit prefill product.)"""
    def codegen(context, builder, signature, args):
        floats = ir.VectorType(ir.FloatType(), 16)
        i32 = ir.IntType(32)
        acc_array, out_array = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 1))
        n_j, n_r = cgutils.unpack_tuple(builder, out_array.shape)
        vectors = builder.bitcast(acc_array.data, floats.as_pointer())  # row (j, r) is vector j R + r
        sums = builder.bitcast(out_array.data, floats.as_pointer())  # rows 16 b .. 16 b + 15 of j: vector j R/16 + b
        levels = _lane_sum_masks(16)
        with cgutils.for_range(builder, builder.mul(n_j, builder.udiv(n_r, ir.Constant(n_r.type, 16)))) as loop:
            first = builder.mul(loop.index, ir.Constant(n_r.type, 16))  # row j R + 16 b
            rows = [builder.add(first, ir.Constant(n_r.type, _bit_reversed(i, 4))) for i in range(16)]  # bit-reversed
            parts = [builder.load(builder.gep(vectors, [row]), align=4) for row in rows]
            for low, high in levels:
                parts = [builder.fadd(*(builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 16), mask))
                                        for mask in (low, high)))
                         for a, b in zip(parts[0::2], parts[1::2])]
            builder.store(parts[0], builder.gep(sums, [loop.index]), align=4)
        return context.get_dummy_value()

    return types.void(acc, out), codegen


@njit(cache=True, parallel=True)
def _prefill_vbmi(quantized, codes_1, codes_2, n_stages, scale_1, scale_2, tables, tables_2, y_rot):
    """y_rot [m, out] = Σ_stages scale · Ŵ_stage x̂ for the quantized rows (`_quantize_rotated_rows`), spans of
    TASK_PASSES passes of PREFILL_OUTPUTS outputs in parallel (the whole chunks only); tables_2: the second
    stage's coordinate tables. A span's codes are decoded once (`_pass_points`); then for each tile of
    TILE_ROWS rows and each chunk, the tile's activations of the chunk (8 KiB) meet every pass and stage of
    the span from the core's first-level cache (`_pass_rows_dot`), both stages adding into one set of lane
    sums (each block's activation scale times its stage's scale); each tile's sums are summed over the
    lanes once (`_lane_sums`) and go to y_rot row by row, the span's outputs side by side in each row."""
    xq, start, d, _ = quantized
    m, n_out = y_rot.shape
    chunks = xq.shape[1] // (CHUNK_CODES * 8)
    d_1, d_2 = d * scale_1, d * scale_2  # [m, in/32] each
    span = PREFILL_OUTPUTS * TASK_PASSES
    for task in prange(-(-n_out // span)):
        o0 = task * span
        width = min(span, n_out - o0)
        passes = -(-width // PREFILL_OUTPUTS)
        points = np.empty((n_stages, TASK_PASSES, chunks, PREFILL_OUTPUTS * 8, 64), dtype=np.uint8)
        for b in range(passes):
            _pass_points(codes_1, o0 + b * PREFILL_OUTPUTS, tables, points[0, b])
            if n_stages == 2:
                _pass_points(codes_2, o0 + b * PREFILL_OUTPUTS, tables_2, points[1, b])
        acc = np.empty((span, TILE_ROWS, 16), dtype=np.float32)  # [span, tile rows, 16] sums per row and lane
        sums = np.empty((span, TILE_ROWS), dtype=np.float32)  # [span, tile rows]
        for r0 in range(0, m, TILE_ROWS):
            r1 = min(r0 + TILE_ROWS, m)
            acc[:] = 0
            for k in range(chunks):
                for b in range(passes):
                    pass_acc = acc[b * PREFILL_OUTPUTS:(b + 1) * PREFILL_OUTPUTS]  # [outputs, tile rows, 16]
                    _pass_rows_dot(points[0, b], k, xq, start, d_1, r0, r1, pass_acc)
                    if n_stages == 2:
                        _pass_rows_dot(points[1, b], k, xq, start, d_2, r0, r1, pass_acc)
            _lane_sums(acc, sums)
            for i in range(r1 - r0):
                for j in range(width):
                    y_rot[r0 + i, o0 + j] = np.float32(0.25) * sums[j, i]


def prefill_applies(packed) -> bool:
    """Whether `matmul_prefill_vbmi` runs this tensor: AVX-512 VBMI (2, 3 and 4 bits), at least one whole chunk
    of CHUNK_CODES codes."""
    return ("avx512vbmi" in _x86_features() and packed.bits in e8p_codebook.BITS
            and packed.in_features >= CHUNK_CODES * e8p_codebook.DIM)


def second_stage_tables(packed) -> tuple:
    """(byte table, coordinate tables) of the last stage: the E8P tables, or for 3 bits the 1-bit E8 stage's."""
    if packed.stage_codes[-1].dtype == np.uint8:
        return one_bit_byte_table(packed.codebook), packed_one_bit_tables(packed.codebook)
    return byte_table(packed.codebook), packed_coordinate_tables(packed.codebook)


def matmul_prefill_vbmi(packed, x: np.ndarray) -> np.ndarray:
    """y [m, out] = x [m, in] @ W.T for many rows in integers (`prefill_applies` must hold): x rotated, quantized
    to Q8_0 as in decode, multiplied by the codes decoded in registers, rotated back.
    Inputs past the last whole chunk (SmolLM2's 576 = 512 + 64) meet their columns of Ŵ, decoded for this
    call, in one float product."""
    x_rot = _transform_in(packed, x)  # [m, in]
    codes = packed.stage_codes
    scales = [np.float32(s) for s in packed.host_scales]
    y_rot = np.empty((x.shape[0], packed.out_features), dtype=np.float32)  # [m, out]
    quantized = _quantize_rotated_rows(x_rot)
    _prefill_vbmi(quantized, codes[0], codes[-1], len(codes), scales[0], scales[-1],
                  packed_coordinate_tables(packed.codebook),
                  second_stage_tables(packed)[1], y_rot)
    tail = quantized[-1]  # [m, in - whole]
    if tail.shape[1]:
        first = (packed.in_features - tail.shape[1]) // e8p_codebook.DIM
        w_tail = np.zeros((packed.out_features, tail.shape[1]), dtype=np.float32)  # [out, in - whole]
        for stage_codes, table, scale, is_e8p in _stages(packed):
            _stage_decode(np.ascontiguousarray(stage_codes[:, first:]), table, scale, is_e8p, 0, w_tail)
        y_rot += tail @ w_tail.T  # [m, out]
    return _transform_out(packed, y_rot)  # [m, out]


@njit(inline="always")
def _tail_group(n_in):
    """The first group of CODES_PER_DOT codes past the whole chunks of CHUNK_CODES codes of n_in inputs."""
    return n_in // (CHUNK_CODES * 8) * CHUNK_CODES // CODES_PER_DOT


@njit(inline="always")
def _by_coordinate(xq, xperm, begin, end, codes):
    """xperm[s + codes i + c] = xq[s + 8 c + i] for each span s of `codes` codes (codes * 8 inputs) from input
    begin to end: the span's inputs coordinate by coordinate."""
    for s in range(begin, end, codes * 8):
        for c in range(codes):
            for i in range(8):
                xperm[s + codes * i + c] = xq[s + 8 * c + i]


@njit(inline="always")
def _chunk_order(xq, xperm, start16):
    """xq [in] int8 as the VBMI kernels read it: xperm coordinate by coordinate, over its whole chunks of
    CHUNK_CODES * 8 inputs (xperm[512 k + 64 i + c] = xq[512 k + 8 c + i]) and, where xperm reaches past
    them, over each later group of CODES_PER_DOT codes (xperm[64 g + 8 i + c] = xq[64 g + 8 c + i],
    `_e8p_tail_rows_vbmi`); start16 −BYTE_ZERO times the sum of each block of 32 it has room for
    (`_e8p_rows_dot_vbmi`, `_pass_rows_dot`)."""
    whole = _tail_group(xperm.shape[0]) * CODES_PER_DOT * 8
    _by_coordinate(xq, xperm, 0, whole, CHUNK_CODES)
    _by_coordinate(xq, xperm, whole, xperm.shape[0], CODES_PER_DOT)
    for b in range(start16.shape[0]):
        total = np.int32(0)
        for i in range(BLOCK):
            total += np.int32(xq[b * BLOCK + i])
        start16[b] = -BYTE_ZERO * total


@njit(cache=True)
def _quantize_rotated(x_rot):
    """(xq int8 [in], d float32 [in/32], start int32 [in/4], xperm int8 [in], start16 int32 [in/32]) of one
    rotated row x_rot [in] (in a multiple of 64): Q8_0 blocks; −BYTE_ZERO times the sum of each group of
    four xq (the lanes of `_e8p_row_dot_vnni`); and for `_e8p_rows_dot_vbmi` and `_e8p_tail_rows_vbmi`, the
    row coordinate by coordinate with its blocks' sums (`_chunk_order`)."""
    n = x_rot.shape[0]
    xq = np.empty(n, dtype=np.int8)  # [in]
    d = np.empty(n // BLOCK, dtype=np.float32)  # [in/32]
    quantize_blocks(x_rot, xq, d)
    start = np.empty(n // 4, dtype=np.int32)  # [in/4]
    for lane in range(n // 4):
        start[lane] = -BYTE_ZERO * (np.int32(xq[4 * lane]) + np.int32(xq[4 * lane + 1]) + np.int32(xq[4 * lane + 2])
                                    + np.int32(xq[4 * lane + 3]))
    xperm = np.empty(n, dtype=np.int8)  # [in]
    start16 = np.empty(n // BLOCK, dtype=np.int32)  # [in/32]
    _chunk_order(xq, xperm, start16)
    return xq, d, start, xperm, start16


@njit(inline="always")
def _add_rows(codes, o, rows, first, vbmi, xq, start, d, xperm, start16, table, tables, scale, out):
    """out[j] += scale · 4 Σ_i point_i d xq_i over row o + j, j < rows: where `vbmi`, whole chunks of
    CHUNK_CODES codes by `_e8p_rows_dot_vbmi` and the rest (from chunk `first` of CODES_PER_DOT codes) of
    eight rows at a time by `_e8p_tail_rows_vbmi`; what is left by `_e8p_row_dot_vnni` row by row."""
    eights = 0
    if vbmi:
        _e8p_rows_dot_vbmi(codes, o, rows, xperm, start16, d, tables, scale, out)
    if first < codes.shape[1] // CODES_PER_DOT:
        if vbmi:
            eights = rows // 8 * 8
            _e8p_tail_rows_vbmi(codes, o, eights, first, xperm, start16, d, tables, scale, out)
        for j in range(eights, rows):
            out[j] += scale * _e8p_row_dot_vnni(codes, o + j, first, xq, start, d, table)


@njit(cache=True, parallel=True)
def _decode_int8(x, signs_in, signs_out, h_in, size_in, h_out, size_out, codes_1, codes_2, n_stages,
                 scale_1, scale_2, table, tables, table_2, tables_2, vbmi, y):
    """y [out] = W x for one row x [in] in one call: x_rot = (x ⊙ s_in) Hᵢᵀ / sqrt(in) on this thread,
    quantized to Q8_0, y_rot = Σ_stages scale · Ŵ_stage x̂ over the outputs in parallel (2 bits: one E8P
    stage; 3 bits: E8P and the 1-bit E8 stage, whose uint8 codes read table_2 / tables_2; 4 bits: two
    E8P stages), y = y_rot Hₒ / sqrt(out) ⊙ s_out on this thread."""
    n_out = y.shape[0]
    xq, d, start, xperm, start16 = _quantize_rotated(_rotate_row(x, signs_in, h_in, size_in, False))
    first = _tail_group(x.shape[0]) if vbmi else 0  # the first group `_add_rows` takes past the VBMI chunks
    y_rot = np.zeros(n_out, dtype=np.float32)  # [out]
    for block in prange(-(-n_out // DECODE_ROWS)):
        o = block * DECODE_ROWS
        rows = min(DECODE_ROWS, n_out - o)
        out = y_rot[o:o + rows]  # [rows]
        _add_rows(codes_1, o, rows, first, vbmi, xq, start, d, xperm, start16, table, tables,
                  scale_1 * np.float32(0.25), out)
        if n_stages == 2:
            _add_rows(codes_2, o, rows, first, vbmi, xq, start, d, xperm, start16, table_2, tables_2,
                      scale_2 * np.float32(0.25), out)
    y[:] = _rotate_row(y_rot, signs_out, h_out, size_out, True)


@njit(inline="always")
def _slot(p, a, b, c):
    """Slot p (0, 1, 2) of a part argument given once per slot (`_decode_int8_parts`)."""
    return a if p == 0 else (b if p == 1 else c)


@njit(cache=True, parallel=True)
def _decode_int8_parts(x, n_parts, h_in, size_in, n_stages, table, tables, table_2, tables_2, vbmi,
                       in_0, out_0, h_0, size_0, first_0, second_0, scale_0, scale2_0, y_0,
                       in_1, out_1, h_1, size_1, first_1, second_1, scale_1, scale2_1, y_1,
                       in_2, out_2, h_2, size_2, first_2, second_2, scale_2, scale2_2, y_2):
    """`_decode_int8` of up to three parts sharing one input x [in] (q/k/v, gate/up) in one call: each part's
    arguments in its slot (signs in, signs out, output Hadamard factor and size, stage codes, stage scales,
    y [out]; unused slots repeat slot 0). The parts' input rotations and quantizations run in parallel, then
    the output blocks of all parts, then the output rotations: what one part at a time ran on the calling
    thread while the other waited (k and v of TinyLlama-1.1B: half their 22 us)."""
    n_in = x.shape[0]
    xq = np.empty((n_parts, n_in), dtype=np.int8)  # [parts, in]
    d = np.empty((n_parts, n_in // BLOCK), dtype=np.float32)  # [parts, in/32]
    start = np.empty((n_parts, n_in // 4), dtype=np.int32)  # [parts, in/4]
    xperm = np.empty((n_parts, n_in), dtype=np.int8)  # [parts, in]
    start16 = np.empty((n_parts, n_in // BLOCK), dtype=np.int32)  # [parts, in/32]
    for p in prange(n_parts):
        quantized = _quantize_rotated(_rotate_row(x, _slot(p, in_0, in_1, in_2), h_in, size_in, False))
        xq[p], d[p], start[p], xperm[p], start16[p] = quantized
    outs = (y_0.shape[0], y_1.shape[0] if n_parts > 1 else 0, y_2.shape[0] if n_parts > 2 else 0)
    bases = (0, outs[0], outs[0] + outs[1])  # where each part's outputs start in y_rot
    blocks = (-(-outs[0] // DECODE_ROWS), -(-outs[1] // DECODE_ROWS), -(-outs[2] // DECODE_ROWS))
    firsts = (0, blocks[0], blocks[0] + blocks[1])  # each part's first block
    y_rot = np.zeros(outs[0] + outs[1] + outs[2], dtype=np.float32)  # [sum of outs] the parts, one after another
    first = _tail_group(n_in) if vbmi else 0  # the first group `_add_rows` takes past the VBMI chunks
    for block in prange(blocks[0] + blocks[1] + blocks[2]):
        p = 0 if block < firsts[1] else (1 if block < firsts[2] else 2)
        o = (block - firsts[p]) * DECODE_ROWS
        rows = min(DECODE_ROWS, outs[p] - o)
        out = y_rot[bases[p] + o:bases[p] + o + rows]  # [rows]
        _add_rows(_slot(p, first_0, first_1, first_2), o, rows, first, vbmi, xq[p], start[p], d[p], xperm[p],
                  start16[p], table, tables, _slot(p, scale_0, scale_1, scale_2) * np.float32(0.25), out)
        if n_stages == 2:
            scale = _slot(p, scale2_0, scale2_1, scale2_2) * np.float32(0.25)
            _add_rows(_slot(p, second_0, second_1, second_2), o, rows, first, vbmi, xq[p], start[p], d[p],
                      xperm[p], start16[p], table_2, tables_2, scale, out)
    for p in prange(n_parts):
        y = _slot(p, y_0, y_1, y_2)
        y[:] = _rotate_row(y_rot[bases[p]:bases[p] + outs[p]], _slot(p, out_0, out_1, out_2), _slot(p, h_0, h_1, h_2),
                           _slot(p, size_0, size_1, size_2), True)


@njit(cache=True)
def decode_int8_prepared(x, n_parts, h_in, size_in, n_stages, table, tables, table_2, tables_2, vbmi,
                         in_0, out_0, h_0, size_0, first_0, second_0, scale_0, scale2_0, y_0,
                         in_1, out_1, h_1, size_1, first_1, second_1, scale_1, scale2_1, y_1,
                         in_2, out_2, h_2, size_2, first_2, second_2, scale_2, scale2_2, y_2):
    """`_decode_int8_parts`'s arguments (`int8_parts_call`) from Numba: `_decode_int8` for one part (one
    parallel region, where the parts kernel opens three), else `_decode_int8_parts`
    (runtime/kernels/decode_layers_numba.py)."""
    if n_parts == 1:
        _decode_int8(x, in_0, out_0, h_in, size_in, h_0, size_0, first_0, second_0, n_stages, scale_0, scale2_0,
                     table, tables, table_2, tables_2, vbmi, y_0)
    else:
        _decode_int8_parts(x, n_parts, h_in, size_in, n_stages, table, tables, table_2, tables_2, vbmi,
                           in_0, out_0, h_0, size_0, first_0, second_0, scale_0, scale2_0, y_0,
                           in_1, out_1, h_1, size_1, first_1, second_1, scale_1, scale2_1, y_1,
                           in_2, out_2, h_2, size_2, first_2, second_2, scale_2, scale2_2, y_2)


@njit(cache=True)
def _rotate_row(x, signs, h_k, size, transpose):
    """(x ⊙ signs) Hᵀ / sqrt(n), or (x H / sqrt(n)) ⊙ signs with `transpose`, of one row x [n] on this thread
    (a function of its own, so that the parallel caller does not turn its loops into parallel regions)."""
    n = x.shape[0]
    ones = np.ones(n, dtype=np.float32)  # [n]
    out = np.empty((1, n), dtype=np.float32)  # [1, n]
    before, after = (ones, signs) if transpose else (signs, ones)
    _hadamard_row(x.reshape(1, n), 0, before, after, h_k, size, transpose, np.float32(1.0 / np.sqrt(n)), out)
    return out[0]


def int8_applies(packed) -> bool:
    """Whether `matmul_int8` runs this tensor: AVX-512 VNNI, whole 64-input chunks (2, 3 and 4 bits)."""
    return ("avx512vnni" in available_kernels() and packed.bits in e8p_codebook.BITS
            and packed.in_features % (CODES_PER_DOT * e8p_codebook.DIM) == 0)


def int8_call(packed) -> tuple:
    """The arguments of `_decode_int8` for this tensor but the row and the output, gathered once (`run_int8`;
    `int8_applies` must hold)."""
    (k_in, p_in), (k_out, p_out) = packed.hadamard_in, packed.hadamard_out
    codes = packed.stage_codes
    scales = [np.float32(s) for s in packed.host_scales]
    return (packed.signs_in, packed.signs_out, small_hadamard(k_in), 1 << p_in, small_hadamard(k_out), 1 << p_out,
            codes[0], codes[-1], len(codes), scales[0], scales[-1], byte_table(packed.codebook),
            packed_coordinate_tables(packed.codebook), *second_stage_tables(packed), "avx512vbmi" in _x86_features())


MAX_PARTS = 3  # parts of one `_decode_int8_parts` call (q/k/v)


def int8_parts_call(parts) -> tuple:
    """The arguments of `_decode_int8_parts` for these parts (2 or 3 tensors of one input size, bit width and
    codebook, each `int8_applies`) but x and the outputs: (shared arguments, each part's slot without y)."""
    slots = []
    for part in parts:
        (signs_in, signs_out, h_in, size_in, h_out, size_out, codes_1, codes_2, n_stages, scale_1, scale_2,
         *tables) = int8_call(part)  # `_decode_int8`'s arguments; the input size, stages and tables are shared
        slots.append((signs_in, signs_out, h_out, size_out, codes_1, codes_2, scale_1, scale_2))
    shared = (len(parts), h_in, size_in, n_stages, *tables)
    return shared, slots + [slots[0]] * (MAX_PARTS - len(slots))


def run_int8_parts(call: tuple, x: np.ndarray, ys: list) -> list:
    """[W x for each part] into ys ([out] float32 each) through a gathered call (`int8_parts_call`)."""
    shared, slots = call
    outs = ys + [ys[0]] * (MAX_PARTS - len(ys))
    _decode_int8_parts(x, *shared, *slots[0], outs[0], *slots[1], outs[1], *slots[2], outs[2])
    return ys


def run_int8(call: tuple, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """y [out] = W x for one row x [in] float32 through a gathered call (`int8_call`)."""
    _decode_int8(x, *call, y)
    return y


def matmul_int8(packed, x: np.ndarray) -> np.ndarray:
    """y [m, out] = x [m, in] @ W.T with the rotated activations quantized to int8 (Q8_0), one row per call
    (`int8_applies` must hold)."""
    call = int8_call(packed)
    y = np.empty((x.shape[0], packed.out_features), dtype=np.float32)  # [m, out]
    for r in range(x.shape[0]):
        run_int8(call, x[r], y[r])
    return y

