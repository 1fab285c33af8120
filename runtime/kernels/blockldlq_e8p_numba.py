"""BlockLDLQ's blocks of 8 columns on the E8P codebook and its residual stages, one lazy batch per call
(QuIP#, Tseng et al. 2024, §4.1 BlockLDLQ, §4.2 E8P, §4.3 RVQ; layerwise.py's `ldlq` holds the algorithm
and its NumPy loop for any quantizer, quipsharp.py's `E8PGrid` the NumPy rounding this repeats).

Within a batch of B columns (the feedback of the earlier batches already added to `targets`), each row o
is rounded block by block, the errors of the batch's earlier blocks fed forward:

    t_k      = targets[o, block k] + Σ_{j < 8k} errors[o, j] Ů[j, block k]           [8]
    stage 1: c_1 = nearest E8P point to t_k / s_1,  r = t_k − s_1 c_1                  (float32, as rvq_encode)
    stage 2: c_2 = nearest point of the second codebook to r / s_2 (3 bits: 1-bit E8, 4 bits: E8P)
    value_k  = s_1 c_1 + s_2 c_2,  errors[o, block k] = W[o, block k] − value_k
    losses[o] += ‖(t_k − value_k) B_k‖²                                               (B_k: `block_ldl`)

A row's work reads only that row, so rows are independent: LANES rows go through each step together, a
row per lane (the E8P search is runtime/kernels/e8p_encode_numba.py's `nearest_lanes`), and `ldlq` splits
the rows over threads. The NumPy loop spent about 1 ms of calls per block of 2048 rows besides the search
(the product with the earlier blocks' errors, decoding the codes, the loss), 1.5 s of OPT-1.3b's fc2.
Sums of the fed-back errors in float32 (the NumPy loop's float32 product sums in another order), the loss
in float64; tests/test_quipsharp.py compares the two loops' codes and losses.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from runtime.kernels.e8p_encode_numba import LANES, nearest_lanes

NO_STAGE, ONE_BIT_STAGE, E8P_STAGE = 0, 1, 2  # the second stage: none (2 bits), 1-bit E8 (3 bits), E8P (4 bits)


@njit(cache=True, nogil=True)
def _nearest_table_lanes(y, table_t, norm2, codes, points):
    """For each column v of y [8, LANES] float32: codes[v] the index of the nearest of the points table_t
    [8, n] float32 (norm2 [n] their squared norms; the first of equals), points[:, v] that point."""
    lanes = y.shape[1]
    best = np.full(lanes, np.inf, dtype=np.float32)  # [LANES]
    choice = np.zeros(lanes, dtype=np.int32)  # [LANES]
    for p in range(table_t.shape[1]):
        p0, p1, p2, p3 = table_t[0, p], table_t[1, p], table_t[2, p], table_t[3, p]
        p4, p5, p6, p7 = table_t[4, p], table_t[5, p], table_t[6, p], table_t[7, p]
        n2 = norm2[p]
        for v in range(lanes):
            dot = (p0 * y[0, v] + p1 * y[1, v] + p2 * y[2, v] + p3 * y[3, v] + p4 * y[4, v] + p5 * y[5, v]
                   + p6 * y[6, v] + p7 * y[7, v])
            dist = n2 - np.float32(2) * dot  # |y − p|² − |y|²
            better = dist < best[v]
            best[v] = dist if better else best[v]
            choice[v] = np.int32(p) if better else choice[v]
    for v in range(lanes):
        codes[v] = choice[v]
        for i in range(8):
            points[i, v] = table_t[i, choice[v]]


@njit(cache=True, nogil=True)
def round_batch(targets, weights, feedback, diagonal, scales, inverse_scales, second, source_t, norm2, parity,
                second_t, second_norm2, quantized, errors, codes, losses):
    """One lazy batch (module docstring) of rows × B columns: targets, weights [rows, B] float64, feedback
    [B, B] float32 Ů's batch block, diagonal [B / 8, 8, 8] float64; scales [stages] float32 s_k and
    inverse_scales [stages] float32 their reciprocals (as stored and as `rvq_encode` multiplies); second: the
    second stage (NO_STAGE, ONE_BIT_STAGE, E8P_STAGE); source_t, norm2, parity: E8P's search tables
    (`search_tables`); second_t [8, 256], second_norm2 [256]: the 1-bit E8 points and their squared norms.
    Writes quantized [rows, B] float64 and errors [rows, B] float32 (views of the whole arrays) and codes
    [stages, rows, B / 8] uint16, adds to losses [rows]."""
    n_rows, width = targets.shape
    residual_errors = np.zeros((width, LANES), dtype=np.float32)  # [B, LANES] errors of the batch so far
    fed = np.empty((8, LANES), dtype=np.float32)  # [8, LANES] Σ errors Ů of the block's columns
    target = np.empty((8, LANES))  # [8, LANES] t_k, float64
    y = np.empty((8, LANES), dtype=np.float32)  # [8, LANES] a stage's input
    value = np.empty((8, LANES), dtype=np.float32)  # [8, LANES] the rounded value so far
    points = np.empty((8, LANES), dtype=np.float32)  # [8, LANES] a stage's points
    stage_codes = np.empty(LANES, dtype=np.uint16)  # [LANES]
    for r0 in range(0, n_rows, LANES):
        count = min(LANES, n_rows - r0)
        residual_errors[:] = 0
        for k in range(width // 8):
            c0 = 8 * k
            fed[:] = 0
            for j in range(c0):
                for i in range(8):
                    weight = feedback[j, c0 + i]
                    for v in range(LANES):
                        fed[i, v] += residual_errors[j, v] * weight
            for i in range(8):
                for v in range(LANES):
                    target[i, v] = targets[r0 + v, c0 + i] + fed[i, v] if v < count else 0.0
                    y[i, v] = np.float32(target[i, v]) * inverse_scales[0]
            nearest_lanes(y, source_t, norm2, parity, stage_codes, points)
            codes[0, r0:r0 + count, k] = stage_codes[:count]
            for i in range(8):
                for v in range(LANES):
                    value[i, v] = scales[0] * points[i, v]
            if second != NO_STAGE:
                for i in range(8):
                    for v in range(LANES):
                        y[i, v] = (np.float32(target[i, v]) - value[i, v]) * inverse_scales[1]
                if second == ONE_BIT_STAGE:
                    _nearest_table_lanes(y, second_t, second_norm2, stage_codes, points)
                else:
                    nearest_lanes(y, source_t, norm2, parity, stage_codes, points)
                codes[1, r0:r0 + count, k] = stage_codes[:count]
                for i in range(8):
                    for v in range(LANES):
                        value[i, v] += scales[1] * points[i, v]
            for v in range(count):
                o = r0 + v
                for i in range(8):
                    quantized[o, c0 + i] = value[i, v]
                    error = np.float32(weights[o, c0 + i] - np.float64(value[i, v]))
                    errors[o, c0 + i] = error
                    residual_errors[c0 + i, v] = error
                loss = 0.0
                for j in range(8):
                    scaled = 0.0
                    for i in range(8):
                        scaled += (target[i, v] - np.float64(value[i, v])) * diagonal[k, i, j]
                    loss += scaled * scaled
                losses[o] += loss
