"""The exact nearest E8P point of each 8-vector (QuIP#'s E8P codebook, Tseng et al. 2024, §4.2): the search
runtime/e8p_codebook.py's `encode` documents, as one Numba loop.

For each shift t = ±¼ and each of the 256 source vectors a, the nearest point of ±a (signs with the parity
the codebook allows) to y = x − t is at squared distance

    |y|² − 2 Σ a_i |y_i| + |a|²  (+ 4 min_i a_i |y_i| when sign(y) has the wrong parity: flip the cheapest)

and the best (shift, a) wins. Here the 256 sources are the inner loop, stored by coordinate, so that each
coordinate's products and minimums are straight loops over the sources; big inputs split over the cores
(`encode_rows`). NumPy's version built [n, 256] temporaries per chunk: 5.6 us a vector on 2 cores, 70 s of
QuIP#'s quantization of two OPT-1.3b-wide layers. This takes 0.62 us (2 million Gaussian vectors, 2 cores
of an AMD EPYC). Sums in float32 as there; the reference in tests/test_e8p_codebook.py is the brute-force
nearest of all 65536 points.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

PARALLEL_VECTORS = 1 << 15  # inputs with fewer vectors are encoded on the calling thread


@njit(cache=True)
def _encode_range(x, source_t, norm2, parity, shift, codes, best, first, last, dot, flip):
    """For vectors first .. last-1 of x [n, 8]: where the nearest point of the shift `shift` (0: −¼, 1: +¼)
    is nearer than best[v], codes[v] and best[v] take it. source_t [8, 256], norm2 [256], parity [256]."""
    t = np.float32(-0.25) if shift == 0 else np.float32(0.25)
    n_source = source_t.shape[1]
    for v in range(first, last):
        y0 = x[v, 0] - t
        ay0 = abs(y0)
        negatives = 1 if y0 < 0 else 0
        yy = y0 * y0
        for a in range(n_source):
            dot[a] = source_t[0, a] * ay0
            flip[a] = dot[a]
        for i in range(1, 8):
            y = x[v, i] - t
            ay = abs(y)
            negatives += 1 if y < 0 else 0
            yy += y * y
            for a in range(n_source):
                term = source_t[i, a] * ay
                dot[a] += term
                flip[a] = term if term < flip[a] else flip[a]
        best_a, best_dist = 0, np.float32(np.inf)
        for a in range(n_source):
            wrong = (negatives + parity[a]) & 1
            dist = yy - np.float32(2) * dot[a] + norm2[a] + np.float32(4) * wrong * flip[a]
            if dist < best_dist:
                best_a, best_dist = a, dist
        if not best_dist < best[v]:
            continue
        best[v] = best_dist
        wrong = (negatives + parity[best_a]) & 1
        cheapest, cheapest_cost = 0, np.float32(np.inf)
        for i in range(8):
            cost = source_t[i, best_a] * abs(x[v, i] - t)
            if cost < cheapest_cost:
                cheapest, cheapest_cost = i, cost
        sign_bits = 0
        for i in range(1, 8):
            negative = 1 if x[v, i] - t < 0 else 0
            if wrong and i == cheapest:
                negative ^= 1
            sign_bits |= negative << i
        codes[v] = (best_a << 8) | sign_bits | shift


@njit(cache=True, parallel=True)
def _encode_parallel(x, source_t, norm2, parity, tasks):
    """uint16 codes [n] of the nearest E8P points to the rows of x [n, 8] float32, the rows split into
    `tasks` ranges over the cores."""
    n = x.shape[0]
    codes = np.zeros(n, dtype=np.uint16)  # [n]
    best = np.full(n, np.inf, dtype=np.float32)  # [n] squared distance of the code so far
    for task in prange(tasks):
        dot = np.empty(source_t.shape[1], dtype=np.float32)  # [256] Σ a_i |y_i|
        flip = np.empty(source_t.shape[1], dtype=np.float32)  # [256] min a_i |y_i|
        first, last = task * n // tasks, (task + 1) * n // tasks
        for shift in range(2):
            _encode_range(x, source_t, norm2, parity, shift, codes, best, first, last, dot, flip)
    return codes


@njit(cache=True)
def _encode_serial(x, source_t, norm2, parity):
    """`_encode_parallel` on the calling thread."""
    codes = np.zeros(x.shape[0], dtype=np.uint16)  # [n]
    best = np.full(x.shape[0], np.inf, dtype=np.float32)  # [n]
    dot = np.empty(source_t.shape[1], dtype=np.float32)  # [256]
    flip = np.empty(source_t.shape[1], dtype=np.float32)  # [256]
    for shift in range(2):
        _encode_range(x, source_t, norm2, parity, shift, codes, best, 0, x.shape[0], dot, flip)
    return codes


def encode_rows(x: np.ndarray, source: np.ndarray, parity: np.ndarray) -> np.ndarray:
    """x [n, 8] float32 -> uint16 [n] codes of the nearest E8P points, for the codebook's source vectors
    source [256, 8] float32 and their parities parity [256] (0 or 1). Fewer than PARALLEL_VECTORS rows (one
    8-column block of BlockLDLQ: 2048 to 8192) are encoded on the calling thread: between that loop's BLAS
    products, whose OpenBLAS workers keep spinning on the other cores, the parallel version took 7 ms for
    2048 rows where it takes 1.2 ms alone."""
    x = np.ascontiguousarray(x, dtype=np.float32)  # [n, 8]
    source_t = np.ascontiguousarray(source.T, dtype=np.float32)  # [8, 256]
    norm2 = (source_t * source_t).sum(axis=0).astype(np.float32)  # [256]
    parity = np.asarray(parity, dtype=np.int64)  # [256]
    if len(x) < PARALLEL_VECTORS or numba.get_num_threads() == 1:
        return _encode_serial(x, source_t, norm2, parity)
    return _encode_parallel(x, source_t, norm2, parity, numba.get_num_threads())
