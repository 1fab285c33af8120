"""LDLQ's column loop on a scalar uniform grid, one lazy batch of columns per call (QuIP, Chee et al. 2023,
§3; layerwise.py's `ldlq` holds the algorithm and its NumPy loop for any quantizer).

Within a batch of B columns (the feedback of the earlier batches already added to `targets`), each row o
is rounded column by column, the errors of the batch's earlier columns fed forward:

    t_k     = targets[o, k] + Σ_{j<k} errors[o, j] Ů[j, k]
    code_k  = clip(rint(t_k / step + center), 0, maxq),  value_k = (code_k − center) · step
    errors[o, k] = W[o, k] − value_k,   losses[o] += ((t_k − value_k) · B_k)²

(B_k: the LDL factor's diagonal, `block_ldl`). A row's work reads only that row, so the rows are
independent. The NumPy loop spends about 70 µs of calls per column (one matrix-vector product, the grid,
four row updates); for OPT-1.3b's fc2 (8192 columns of 2048 rows) that was 2.3 s of its 4.1 s of LDLQ. The
loop runs on the calling thread (without the GIL): `ldlq` gives each core a range of rows. The errors are stored
in float32 as the NumPy loop's; the within-batch sums run in float64 here (float32 products there), so the
two give the same codes and losses to float32's precision (tests/test_quip.py compares them).
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, fastmath=True, nogil=True)
def round_batch(targets, weights, feedback_t, diagonal, step, center, maxq, quantized, errors, codes, losses):
    """One lazy batch (module docstring): targets, weights [out, B] float64, feedback_t [B, B] = Ů's batch
    block transposed (row k: the weights of the columns j < k in t_k), diagonal [B]; writes quantized [out, B]
    float64 and errors [out, B] float32 (views of the whole arrays), codes [out, B] uint8, adds to losses
    [out]."""
    n_out, width = targets.shape
    row_errors = np.empty(width)  # [B] this row's errors so far, contiguous (the sums below vectorize)
    for o in range(n_out):
        for k in range(width):
            target = targets[o, k]
            for j in range(k):
                target += row_errors[j] * feedback_t[k, j]
            code = min(max(np.rint(target / step + center), 0.0), maxq)
            value = (code - center) * step
            row_errors[k] = weights[o, k] - value
            quantized[o, k] = value
            errors[o, k] = row_errors[k]
            codes[o, k] = np.uint8(code)
            scaled = (target - value) * diagonal[k]
            losses[o] += scaled * scaled
