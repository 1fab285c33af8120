"""Numba CPU kernels of the incoherent format's transforms (layout and NumPy reference:
runtime/formats/incoherent.py; QuIP, Chee et al. 2023, §4 and the supplement's Kronecker factors).

A transform M = P_post (A ⊗ B) P_pre on a row v [n], n = a b, is: gather
v[perm_pre] into X [a, b], X -> A X Bᵀ, place the flattened result by
perm_post. `transform_row` runs it as

    X[r, c] = v[first[k]] * scale[k] + shift * add[k]     (k = r b + c; scale, add optional)
    M       = L X R                                       L [a, a], R [b, b]
    out[dest[r, c]] = M[r, c]

with L = A, R = Bᵀ, first = perm_pre for M, and L = Aᵀ, R = B, first =
inv_post for Mᵀ (`KronOrthogonal.kernel_factors`), dest the inverse of the
last gather. `row_transform` lays a transform out once for these kernels:
`scale` and `add` already gathered by `first` (QuIP's D⁻¹ on the input side,
its midrise half step on the output side, whose multiplier `shift` is the sum
of the inner product's input, sum(x Vᵀ), computed here), R's rows padded with
zero columns to whole 16-float registers so that both products are row
updates T[i, :] += L[i, k] X[k, :], M[i, :] += T[i, k] R[k, :] by register
blocks (`combine_rows`, where a is a multiple of 4), and int32 positions.

`transform_row` serves one row (decode) on the calling thread: with it
SmolLM2 quip2 decodes 79 tok/s where NumPy's gathers and two small matmuls
per transform gave 58 (splitting L's rows over two threads measured slower:
each band paid a parallel region and its own gather of X for 3.4 us of
products at 2048 points). `transform_rows` serves many (prefill): the rows
split over the threads, each thread reusing its buffers; the NumPy version
(`KronOrthogonal.apply`: gathers, batched matmuls, on the kept worker
threads) took 650-990 us for 128 rows of 2048 points where this takes 460-600
(2 threads), and TinyLlama-shaped quip2 prefill went 77 -> 84-91 tok/s.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import get_num_threads, njit, prange

from runtime.kernels.numba_common import COMBINE_WIDTH, combine_rows, combines


class RowTransform(NamedTuple):
    """One transform (and its pre-gathered input scale or output shift) as the row kernels take it."""
    scale: np.ndarray  # float32 [n] the input's scale gathered by `first` (empty: none)
    add: np.ndarray  # float32 [n] the half step gathered by `first`, times sum(shift_of) (empty: none)
    first: np.ndarray  # int32 [n] v's entry of X's k-th value
    left: np.ndarray  # float32 [a, a] L
    right: np.ndarray  # float32 [b, width] R, zero columns up to width, a multiple of COMBINE_WIDTH
    dest: np.ndarray  # int32 [a, b] out's entry of M[r, c]


class TransformedCall(NamedTuple):
    """A one-row product of incoherent parts as runtime/kernels/decode_layers_numba.py runs it
    (IncoherentTensor.prepared_call): each part's transforms around one prepared call of their inner tensors,
    each part with its own input."""
    inner: tuple  # the inner tensors' uniform_int8_numba.PreparedCall
    transforms: tuple  # (into, back) RowTransform of each part: V on x D⁻¹, Uᵀ on the product


def row_transform(factors: tuple, scale=None, add=None) -> RowTransform:
    """The RowTransform of `KronOrthogonal.kernel_factors` (first, left, right, last), with an optional scale
    on the input or half step on the output (float32 [n] in v's order)."""
    first, left, right, last = factors
    n, a, b = first.shape[0], left.shape[0], right.shape[0]
    width = -(-b // COMBINE_WIDTH) * COMBINE_WIDTH
    padded = np.zeros((b, width), dtype=np.float32)  # [b, width]
    padded[:, :b] = right
    dest = np.empty(n, dtype=np.int32)  # [a * b]
    dest[np.asarray(last)] = np.arange(n, dtype=np.int32)

    def gathered(values):
        return np.zeros(0, np.float32) if values is None else np.ascontiguousarray(values[first], dtype=np.float32)
    return RowTransform(gathered(scale), gathered(add), np.asarray(first, dtype=np.int32),
                        np.ascontiguousarray(left, dtype=np.float32), padded, dest.reshape(a, b))


def transform(v: np.ndarray, row: RowTransform, shift_of: np.ndarray) -> np.ndarray:
    """The transform (`row_transform`) of one row v [n] (`transform_row`) or of each row of v [m, n]
    (`transform_rows`, over the threads), the half step times the sum of shift_of's row (shift_of [n] or
    [m, ·]; empty: no shift): float32 like v."""
    if v.ndim == 1:
        return transform_row(v, row.scale, row.add, shift_of, row.first, row.left, row.right, row.dest)
    return transform_rows(v, row.scale, row.add, shift_of, row.first, row.left, row.right, row.dest,
                          min(get_num_threads(), v.shape[0]))


@njit(inline="always")
def _transform_into(v, scale, add, shift, first, left, right, dest, x, t, m, out):
    """out [n] = the transform of v [n] (module docstring), through the buffers x, t, m [a, width] (x's pad
    columns zero)."""
    a, b = left.shape[0], dest.shape[1]
    for r in range(a):
        for c in range(b):
            k = r * b + c
            value = v[first[k]]
            if scale.shape[0] > 0:
                value *= scale[k]
            if add.shape[0] > 0:
                value += shift * add[k]
            x[r, c] = value
    if combines(a, right.shape[1]):  # register blocks: T = L X, M = T R
        combine_rows(left, x, t, False)
        combine_rows(t, right, m, False)
    else:
        t[:] = 0
        m[:] = 0
        for i in range(a):
            for k in range(a):
                coef = left[i, k]
                for j in range(b):
                    t[i, j] += coef * x[k, j]
        for i in range(a):
            for k in range(b):
                coef = t[i, k]
                for j in range(b):
                    m[i, j] += coef * right[k, j]
    for r in range(a):
        for c in range(b):
            out[dest[r, c]] = m[r, c]


@njit(inline="always")
def _shift(add, shift_of):
    """sum(shift_of) where there is a half step to scale (float32 accumulation), else 0."""
    shift = np.float32(0)
    if add.shape[0] > 0:
        for value in shift_of:
            shift += value
    return shift


@njit(inline="always")
def _buffers(left, right):
    """x, t, m [a, width] float32 for `_transform_into` (zero: x's pad columns stay zero)."""
    shape = (left.shape[0], right.shape[1])
    return np.zeros(shape, np.float32), np.zeros(shape, np.float32), np.zeros(shape, np.float32)


@njit(cache=True, fastmath=True)
def transform_row(v, scale, add, shift_of, first, left, right, dest):
    """The transform of one row v [n] on the calling thread (module docstring; arrays of `row_transform`,
    shift = sum(shift_of)): out [n] float32."""
    out = np.empty(first.shape[0], dtype=np.float32)  # [n]
    x, t, m = _buffers(left, right)
    _transform_into(v, scale, add, _shift(add, shift_of), first, left, right, dest, x, t, m, out)
    return out


@njit(cache=True, fastmath=True, parallel=True)
def transform_rows(v, scale, add, shift_of, first, left, right, dest, threads):
    """`transform_row` of each row of v [m, n] (shift: the sum of shift_of's row), the rows in `threads`
    contiguous ranges in parallel, each one call of `_transform_range` (as e8p_numba._hadamard_rows: the row
    code inlined here would turn its array steps into nested parallel loops): out [m, n] float32."""
    rows = v.shape[0]
    out = np.empty((rows, first.shape[0]), dtype=np.float32)  # [m, n]
    for task in prange(threads):
        _transform_range(v, scale, add, shift_of, first, left, right, dest, task * rows // threads,
                         (task + 1) * rows // threads, out)
    return out


@njit(cache=True, fastmath=True)
def _transform_range(v, scale, add, shift_of, first, left, right, dest, r0, r1, out):
    """out[i] = the transform of v[i] for the rows r0 .. r1-1 on this thread, through one set of buffers."""
    x, t, m = _buffers(left, right)
    for i in range(r0, r1):
        _transform_into(v[i], scale, add, _shift(add, shift_of[i]), first, left, right, dest, x, t, m, out[i])
