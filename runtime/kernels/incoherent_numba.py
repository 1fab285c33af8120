"""Numba CPU kernels of the incoherent format's transforms (layout and NumPy reference:
runtime/formats/incoherent.py; QuIP, Chee et al. 2023, §4 and the supplement's Kronecker factors).

A transform M = P_post (A ⊗ B) P_pre on a row v [n], n = a b, is: gather
v[perm_pre] into X [a, b], X -> A X Bᵀ, gather the flattened result by
perm_post. `transform_row` runs it as

    X[k] = v[first[k]] * scale[first[k]] + shift * add[first[k]]      (k < n; scale, add optional)
    M    = L X R                                                       L [a, a], R [b, b]
    out[i] = M.flat[last[i]]

with L = A, R = Bᵀ, first = perm_pre, last = perm_post for M, and L = Aᵀ,
R = B, first = inv_post, last = inv_pre for Mᵀ (`KronOrthogonal.kernel_factors`:
the factors laid out once so that both products are row updates
T[i, :] += L[i, k] X[k, :], M[i, :] += T[i, k] R[k, :], which vectorize
over the rows' b entries; `combine_rows` runs them by register blocks where
a is a multiple of 4, with R's rows padded to whole registers, `row_factors`).
`scale` carries QuIP's D⁻¹ on the input side, `shift * add` its midrise half
step (sum(x Vᵀ) · scale / 2) on the output side. It serves one row (decode),
on the calling thread: with it SmolLM2 quip2 decodes 79 tok/s where NumPy's
gathers and two small matmuls per transform gave 58. Many rows (prefill) keep
NumPy's batched matmuls, which measured faster than these loops over rows in
parallel (303 against 258 tok/s).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from runtime.kernels.numba_common import COMBINE_WIDTH, combine_rows, combines


def row_factors(factors: tuple) -> tuple:
    """(first, left, right, last) of `KronOrthogonal.kernel_factors` as `transform_row` takes them: right [b, b]
    with zero columns up to a multiple of COMBINE_WIDTH (its product rows then fill whole registers), and
    last as positions in the padded rows (no division by b per element: a gather took 3x the products)."""
    first, left, right, last = factors
    b = right.shape[0]
    width = -(-b // COMBINE_WIDTH) * COMBINE_WIDTH
    padded = np.zeros((b, width), dtype=np.float32)  # [b, width]
    padded[:, :b] = right
    return first, np.ascontiguousarray(left, dtype=np.float32), padded, last // b * width + last % b


@njit(cache=True, fastmath=True)
def transform_row(v, scale, add, shift, first, left, right, last):
    """The transform of one row v [n] on the calling thread (module docstring; factors from `row_factors`): out
    [n] float32."""
    a, width = left.shape[0], right.shape[1]
    b = first.shape[0] // a
    x = np.zeros((a, width), np.float32)  # [a, b padded]
    t, m = np.zeros((a, width), np.float32), np.zeros((a, width), np.float32)  # [a, b padded]
    for r in range(a):
        for c in range(b):
            j = first[r * b + c]
            value = v[j]
            if scale.shape[0] > 0:
                value *= scale[j]
            if add.shape[0] > 0:
                value += shift * add[j]
            x[r, c] = value
    if combines(a, width):  # register blocks: T = L X, M = T R
        combine_rows(left, x, t, False)
        combine_rows(t, right, m, False)
    else:
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
    flat = m.reshape(-1)  # [a * width]
    out = np.empty(a * b, dtype=np.float32)  # [n]
    for i in range(a * b):
        out[i] = flat[last[i]]
    return out
