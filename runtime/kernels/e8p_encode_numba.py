"""The exact nearest E8P point of 8-vectors (QuIP#'s E8P codebook, Tseng et al. 2024, §4.2): the search
runtime/e8p_codebook.py's `encode` documents, as Numba loops over many vectors at once.

For each shift t = ±¼ and each of the 256 source vectors a, the nearest point of ±a (signs with the parity
the codebook allows) to y = x − t is at squared distance

    |y|² − 2 Σ a_i |y_i| + |a|²  (+ 4 min_i a_i |y_i| when sign(y) has the wrong parity: flip the cheapest)

and the best (shift, a) wins (the first in the order shift −¼ then +¼, sources in order). `nearest_lanes`
takes LANES vectors as the columns of an [8, LANES] array: for each source, the distances of all of them are
one straight loop over the lanes that LLVM vectorizes (16 float32 lanes per AVX-512 register), and the
running minimum is a select per lane. Searching one vector at a time (the sources as the inner loop, then
an argmin over them that does not vectorize) took 1.2 us a vector on one core of an AMD EPYC; this takes
0.2 (2 million Gaussian vectors). BlockLDLQ's kernel (runtime/kernels/blockldlq_e8p_numba.py) calls
`nearest_lanes` on a block of rows; `encode_rows` on any number of vectors, split over the cores when
they are many. Sums in float32; the reference in tests/test_e8p_codebook.py is the brute-force nearest of
all 65536 points.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

LANES = 64  # vectors per search: four AVX-512 registers of float32 per coordinate
PARALLEL_VECTORS = 1 << 15  # inputs with fewer vectors are encoded on the calling thread


@njit(cache=True, nogil=True)
def nearest_lanes(y, source_t, norm2, parity, codes, points):
    """For each column v of y [8, LANES] float32: codes[v] uint16, the code of the nearest E8P point, and
    points[:, v] float32, that point. source_t [8, 256] float32 the source vectors S transposed, norm2 [256]
    float32 |S_a|², parity [256] float32 Σ S_a mod 2 (0 or 1)."""
    lanes = y.shape[1]
    ay = np.empty((8, lanes), dtype=np.float32)  # |y − t|
    odd = np.empty(lanes, dtype=np.float32)  # 1 where y − t has an odd number of negative coordinates
    yy = np.empty(lanes, dtype=np.float32)  # |y − t|²
    best = np.full(lanes, np.inf, dtype=np.float32)  # squared distance of the best point so far
    choice = np.zeros(lanes, dtype=np.int32)  # its 2 a + shift
    for shift in range(2):
        t = np.float32(-0.25) if shift == 0 else np.float32(0.25)
        odd[:] = 0
        yy[:] = 0
        for i in range(8):
            for v in range(lanes):
                d = y[i, v] - t
                ay[i, v] = abs(d)
                odd[v] = np.float32(1) - odd[v] if d < 0 else odd[v]
                yy[v] += d * d
        for a in range(source_t.shape[1]):
            pa, n2, label = parity[a], norm2[a], np.int32(2 * a + shift)
            for v in range(lanes):  # the loop over the 8 coordinates is unrolled, this one vectorizes
                dot = source_t[0, a] * ay[0, v]
                flip = dot
                for i in range(1, 8):
                    term = source_t[i, a] * ay[i, v]
                    dot, flip = dot + term, min(flip, term)
                wrong = abs(odd[v] - pa)  # 1 where the signs of y − t break the parity rule of a
                dist = yy[v] - np.float32(2) * dot + n2 + np.float32(4) * wrong * flip
                better = dist < best[v]
                best[v] = dist if better else best[v]
                choice[v] = label if better else choice[v]
    for v in range(lanes):  # the winner's signs: those of y − t, the cheapest coordinate flipped if needed
        a, shift = choice[v] >> 1, choice[v] & 1
        t = np.float32(0.25) if shift else np.float32(-0.25)
        negatives, cheapest, cheapest_cost = 0, 0, np.float32(np.inf)
        for i in range(8):
            d = y[i, v] - t
            negatives += 1 if d < 0 else 0
            cost = source_t[i, a] * abs(d)
            if cost < cheapest_cost:
                cheapest, cheapest_cost = i, cost
        wrong = (negatives + int(parity[a])) & 1
        sign_bits = 0
        for i in range(8):
            negative = 1 if y[i, v] - t < 0 else 0
            if wrong and i == cheapest:
                negative ^= 1
            if i > 0:
                sign_bits |= negative << i
            points[i, v] = (-source_t[i, a] if negative else source_t[i, a]) + t
        codes[v] = np.uint16((a << 8) | sign_bits | shift)


@njit(cache=True, nogil=True)
def _encode_chunks(x, source_t, norm2, parity, first, last, codes):
    """codes[v] for the vectors of chunks first .. last-1 (LANES vectors each) of x [n, 8] float32."""
    n = x.shape[0]
    y = np.zeros((8, LANES), dtype=np.float32)  # [8, LANES] one chunk, a vector per column
    points = np.empty((8, LANES), dtype=np.float32)  # [8, LANES]
    chunk_codes = np.empty(LANES, dtype=np.uint16)  # [LANES]
    for chunk in range(first, last):
        v0 = chunk * LANES
        count = min(LANES, n - v0)
        for v in range(LANES):
            for i in range(8):
                y[i, v] = x[v0 + v, i] if v < count else np.float32(0)
        nearest_lanes(y, source_t, norm2, parity, chunk_codes, points)
        codes[v0:v0 + count] = chunk_codes[:count]


@njit(cache=True, parallel=True)
def _encode_parallel(x, source_t, norm2, parity, tasks, codes):
    """`_encode_chunks` of all of x [n, 8], the chunks split into `tasks` ranges over the cores."""
    chunks = (x.shape[0] + LANES - 1) // LANES
    for task in prange(tasks):
        _encode_chunks(x, source_t, norm2, parity, task * chunks // tasks, (task + 1) * chunks // tasks, codes)


def search_tables(source: np.ndarray, parity: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source_t [8, 256], norm2 [256], parity [256]) float32, the tables `nearest_lanes` reads, of the
    codebook's source vectors source [256, 8] and their parities parity [256] (0 or 1)."""
    source_t = np.ascontiguousarray(source.T, dtype=np.float32)  # [8, 256]
    return source_t, (source_t * source_t).sum(axis=0).astype(np.float32), np.asarray(parity, dtype=np.float32)


def encode_rows(x: np.ndarray, source: np.ndarray, parity: np.ndarray) -> np.ndarray:
    """x [n, 8] float32 -> uint16 [n] codes of the nearest E8P points, for the codebook's source vectors
    source [256, 8] float32 and their parities parity [256] (0 or 1); fewer than PARALLEL_VECTORS vectors
    are encoded on the calling thread (waking the workers costs more)."""
    x = np.ascontiguousarray(x, dtype=np.float32)  # [n, 8]
    tables = search_tables(source, parity)
    codes = np.empty(len(x), dtype=np.uint16)  # [n]
    if len(x) < PARALLEL_VECTORS or numba.get_num_threads() == 1:
        _encode_chunks(x, *tables, 0, (len(x) + LANES - 1) // LANES, codes)
    else:
        _encode_parallel(x, *tables, numba.get_num_threads(), codes)
    return codes
