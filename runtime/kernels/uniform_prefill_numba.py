"""Integer prefill of the blocked codes (runtime/kernels/uniform_int8_numba.py): many rows at once, AVX-512 VNNI.

Prefill multiplies every weight by a block of rows (the prompt's tokens), so
it is bound by arithmetic, not by memory, and `vpdpbusd` does four times the
multiply-adds of a float32 FMA per instruction. Float accuracy is kept with
two bytes per activation (runtime/kernels/quant_activations_numba.py,
LEVELS16): per run of 32 inputs of a row, d = max|x| / 32639 and
q = rint(x / d) = 256 hi + lo with signed bytes hi, lo, so that

    dot_r = sum_k code_k q_k = 256 * sum_k code_k hi_k + sum_k code_k lo_k

is two byte dot products, exact in int32 (8-bit codes: 32 * 255 * 127 * 256
< 2^31). The activation rounding is 1/256 of Q8_0's, about 1e-5 of each
block's largest value: WikiText-2 perplexity moves by less than the float32
summation order does (`eval.py` measures it). llama.cpp multiplies its Q4_0
weights by one-byte Q8_0 activations in prefill; this kernel spends the second
dot product to keep the prefill equal to the float reference instead.

A pass over one tile of 16 outputs (the blocked layout) takes CHUNK rows:
each run's `bits` code words are loaded and split into eight vectors of four
codes per lane once, then multiplied by the hi and lo words of every row of
the chunk; the chunk's sums stay in registers through a group, the group's
scale and zero point are applied once per group and row (zero point times
the row's group sum of d * q). Tasks take ranges of tiles; the rows go by in
blocks of ROW_BLOCK, whose activations stay in the core's cache while the
task's tiles pass. Rows past the last are zero and dropped.

4-bit codes through a table (NF4, FP4) take the table's int16 values times
the activations as int16 (`vpdpwssd`, uniform_int8_numba._table_run_dot).
Groups of 16 (SpQR) take each half run as a group, as the decode tiles do,
HALF_RUN_CHUNK rows a pass (`chunk_rows`)
(uniform_int8_numba._group_loops). Other CPUs dequantize the blocked codes
into float tiles for BLAS (uniform_int8_numba.matmul_prefill).
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils

from runtime.kernels.numba_common import variant_switch
from runtime.kernels.quant_activations_numba import BLOCK
from runtime.kernels.uniform_int8_numba import (CONTRACT, HALF_RUN_GROUPS, TILE, WORDS_PER_RUN, KernelWeight,
                                                _fold_group, _group_loops, _load_lanes, _run_codes, _run_dot,
                                                _run_parts, _splat, _table_bytes, available_kernels,
                                                matmul_prefill, quantize_stored, tile_order)
from runtime.kernels.uniform_numba import readonly

CHUNK = 4  # rows per pass over a tile's codes (2 sums of 16 lanes per row in registers)
HALF_RUN_CHUNK = 16  # rows per pass with groups of half runs (SpQR's 16): two group folds a run per row
ROW_BLOCK = 32  # rows whose activations a task keeps in cache while its tiles go by
INT_BITS = (2, 3, 4, 8)  # code widths of the integer kernel

_I8, _I32, _F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()


def _chunk_codegen(bits: int, lut: bool, chunk: int):
    """The code of chunk(blocked, tile, scales, zeros, hi, lo, d, q, xsum, table, group_runs, row0, y) (types:
    `_chunk_typer`) setting y[row0 + c, 16 tile : 16 tile + 16] = W x_c for the `chunk` rows c of the two-byte
    activations (hi, lo: int8 and q: int16 [rows, runs*32] in the tiles' byte order; d [rows, runs]; xsum [rows,
    groups]: each group's sum of d * q), tile `tile` of the blocked codes and its statistics [tiles, groups, 16].
    Each run's code vectors (with `lut`, their table bytes: table uint8 [32], 4 bits) are made once and multiplied
    by every row of the chunk (uniform_int8_numba._run_codes, _run_dot)."""

    def codegen(context, builder, signature, args):
        if "avx512vnni" not in available_kernels():  # compiled, never run
            return context.get_dummy_value()
        tile, group_runs, row0 = args[1], args[10], args[11]
        arrays = {i: context.make_array(signature.args[i])(context, builder, args[i])
                  for i in (0, 2, 3, 4, 5, 6, 7, 8, 9, 12)}

        def start(i, index):  # i8* to element `index` of axis 0 of array argument i, and the strides
            strides = cgutils.unpack_tuple(builder, arrays[i].strides)
            data = builder.bitcast(arrays[i].data, _I8.as_pointer())
            return builder.gep(data, [builder.mul(index, strides[0])]), strides

        def row_of(i, c):  # typed pointer to row row0 + c of 2-D array argument i
            pointer, _ = start(i, builder.add(row0, ir.Constant(row0.type, c)))
            return builder.bitcast(pointer, context.get_data_type(signature.args[i].dtype).as_pointer())

        codes_row, _ = start(0, tile)
        scale_row, scale_strides = start(2, tile)
        zero_row, zero_strides = start(3, tile)
        hi = [builder.bitcast(row_of(4, c), _I32.as_pointer()) for c in range(chunk)]
        lo = [builder.bitcast(row_of(5, c), _I32.as_pointer()) for c in range(chunk)]
        d, xsum = ([row_of(i, c) for c in range(chunk)] for i in (6, 8))
        wide = [builder.bitcast(row_of(7, c), ir.IntType(64).as_pointer()) for c in range(chunk)]
        n_runs = cgutils.unpack_tuple(builder, arrays[6].shape)[1]
        n_groups = cgutils.unpack_tuple(builder, arrays[2].shape)[1]
        vector, floats = ir.VectorType(_I32, TILE), ir.VectorType(_F32, TILE)
        tables = _table_bytes(builder, arrays[9].data) if lut else ()
        totals = [cgutils.alloca_once_value(builder, ir.Constant(floats, None)) for _ in range(chunk)]
        sums = [cgutils.alloca_once(builder, floats) for _ in range(chunk)]

        def run_terms(r, split):  # [[d[r, c] * dot of each row c]] of run r (split: of each half run)
            words = builder.bitcast(builder.gep(codes_row, [builder.mul(r, ir.Constant(r.type, bits * TILE * 4))]),
                                    vector.as_pointer())
            vectors = _run_codes(builder, [builder.load(builder.gep(words, [ir.Constant(_I32, t)]), align=4)
                                           for t in range(bits)], bits, tables)
            first = builder.mul(r, ir.Constant(r.type, WORDS_PER_RUN))
            rows = []
            for c in range(chunk):
                x_run = [builder.gep(x[c], [first]) for x in (hi, lo, wide)]
                scale = _splat(builder, builder.load(builder.gep(d[c], [r])), TILE)
                dots = _run_parts(builder, vectors, bits, split, lambda part, at: _run_dot(
                    builder, part, *(builder.gep(x, [ir.Constant(_I32, at)]) for x in x_run), "avx512vnni"))
                rows.append([builder.fmul(dot, scale, flags=CONTRACT) for dot in dots])
            return [[rows[c][part] for c in range(chunk)] for part in range(len(rows[0]))]

        def fold(g):
            group_scales = _load_lanes(builder, builder.gep(scale_row, [builder.mul(g, scale_strides[1])]), 0, TILE,
                                       signature.args[2].dtype)
            group_zeros = _load_lanes(builder, builder.gep(zero_row, [builder.mul(g, zero_strides[1])]), 0, TILE,
                                      signature.args[3].dtype)
            for c in range(chunk):
                group_sum = _splat(builder, builder.load(builder.gep(xsum[c], [g])), TILE)
                _fold_group(builder, totals[c], sums[c], group_scales, group_zeros, group_sum)

        _group_loops(builder, group_runs, n_runs, n_groups, sums, run_terms, fold, half_runs=not lut)
        for c in range(chunk):
            out = builder.gep(row_of(12, c), [builder.mul(tile, ir.Constant(tile.type, TILE))])
            builder.store(builder.load(totals[c]), builder.bitcast(out, floats.as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


def _chunk_typer(typingctx, blocked, tile, scales, zeros, hi, lo, d, q, xsum, table, group_runs, row0, y):
    """The signature of a chunk kernel (`_chunk_codegen`)."""
    return types.void(blocked, types.int64, scales, zeros, hi, lo, d, q, xsum, table, types.int64, types.int64,
                      y), None


# (bits, table, rows per pass); variant v: entry v - 1
CHUNK_VARIANTS = (tuple((bits, False, CHUNK) for bits in INT_BITS) + ((4, True, CHUNK),)
                  + tuple((bits, False, HALF_RUN_CHUNK) for bits in INT_BITS))
# _CHUNK(variant, ...): the chunk kernel CHUNK_VARIANTS[variant - 1]
_CHUNK = variant_switch(_chunk_typer, [_chunk_codegen(*variant) for variant in CHUNK_VARIANTS])


@njit(cache=True, parallel=True)
def quantize_rows(x, perm, bits, n_runs, group_runs, n_groups, rows):
    """(hi, lo [rows, runs*32] int8 and q [rows, runs*32] int16 in the tiles' byte order, d [rows, runs]
    float32, xsum [rows, groups] float32) of the two-byte activations of x [m, in] (rows >= m: zero rows after
    x's), each row in storage order (perm; empty: identity), zero-padded to whole runs; rows in parallel."""
    m = x.shape[0]
    hi = np.empty((rows, n_runs * BLOCK), dtype=np.int8)  # [rows, runs*32]
    lo = np.empty((rows, n_runs * BLOCK), dtype=np.int8)  # [rows, runs*32]
    q = np.empty((rows, n_runs * BLOCK), dtype=np.int16)  # [rows, runs*32]
    d = np.empty((rows, n_runs), dtype=np.float32)  # [rows, runs]
    xsum = np.zeros((rows, n_groups), dtype=np.float32)  # [rows, groups]
    hi[m:], lo[m:], q[m:], d[m:] = 0, 0, 0, 0  # the zero rows after x's
    for row in prange(m):
        values = np.empty(n_runs * BLOCK, dtype=np.int16)  # [runs*32] in storage order
        quantize_stored(x[row], perm, n_runs, values, d[row])
        tile_order(values, d[row], bits, group_runs, hi[row], lo[row], q[row], xsum[row])
    return hi, lo, d, q, xsum


@njit(cache=True, parallel=True)
def _prefill(blocked, scales, zeros, hi, lo, d, q, xsum, variant, chunk, group_runs, lut, threads):
    """y [rows, tiles * 16] of the quantized rows (`quantize_rows`, rows a multiple of `chunk`) by chunk kernel
    `variant` (CHUNK_VARIANTS, `chunk` rows per pass), the tiles split over `threads` tasks."""
    n_tiles, rows = blocked.shape[0], hi.shape[0]
    y = np.empty((rows, n_tiles * TILE), dtype=np.float32)  # [rows, tiles * 16]
    tasks = min(threads, n_tiles)
    for t in prange(tasks):
        for block in range(0, rows, ROW_BLOCK):
            for tile in range(t * n_tiles // tasks, (t + 1) * n_tiles // tasks):
                for row0 in range(block, min(block + ROW_BLOCK, rows), chunk):
                    _CHUNK(variant, blocked, tile, scales, zeros, hi, lo, d, q, xsum, lut, group_runs, row0, y)
    return y


def chunk_rows(weight: KernelWeight) -> int:
    """Rows per pass for this weight: HALF_RUN_CHUNK with groups of half runs, whose two folds a run per row
    cost as much as the dot products (reading each run's codes once for 16 rows, not 4: TinyLlama-1.1B's
    3-bit SpQR prefill 80 -> 94 tok/s; 16 rows of whole-run groups spill registers: 2-bit 140 -> 84), else
    CHUNK."""
    return HALF_RUN_CHUNK if weight.group_runs == HALF_RUN_GROUPS and weight.lut.shape[0] == 0 else CHUNK


def chunk_variant(bits: int, lut: bool, rows: int = CHUNK) -> int:
    """The variant number of `_CHUNK` for codes of `bits` (through a table with `lut`), `rows` rows per pass:
    1 + its index in CHUNK_VARIANTS."""
    return CHUNK_VARIANTS.index((bits, lut, rows)) + 1


def integer_prefill(weight: KernelWeight, kernel: str) -> bool:
    """Whether `matmul` multiplies this weight in integers with `kernel` (avx512vnni; 2/3/4/8-bit codes, or
    4-bit codes through a table)."""
    return kernel == "avx512vnni" and weight.bits in INT_BITS


def matmul(weight: KernelWeight, values: np.ndarray, x: np.ndarray, kernel: str) -> np.ndarray:
    """y [m, out] = x [m, in] @ W.T of the blocked codes for many rows x (float32): in integers with two-byte
    activations where `integer_prefill`, else dequantized tiles and BLAS (values [2**bits] float32: each
    code's value, `uniform_int8_numba.matmul_prefill`)."""
    if not integer_prefill(weight, kernel):
        return matmul_prefill(weight, values, x)
    n_runs = weight.blocked.shape[1] // (weight.bits * TILE)
    chunk = chunk_rows(weight)
    rows = -(-x.shape[0] // chunk) * chunk
    quantized = quantize_rows(readonly(np.ascontiguousarray(x, dtype=np.float32)), weight.perm, weight.bits, n_runs,
                              weight.group_runs, weight.scales.shape[1], rows)
    variant = chunk_variant(weight.bits, weight.lut.shape[0] > 0, chunk)
    y = _prefill(weight.blocked, weight.scales, weight.zeros, *quantized, variant, chunk, weight.group_runs,
                 weight.lut, numba.get_num_threads())  # [rows, tiles * 16]
    return y[:x.shape[0], :weight.out_features]
