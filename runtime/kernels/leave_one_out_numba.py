"""SpQR's leave-one-out outlier test for the min-max grid, one Numba loop per row (Dettmers et al. 2023,
"SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight Compression", Algorithm 1's outlier
detection; reference: `get_leave_one_out_error`).

For a row v of a group's weights [n] and U_kk [n], the error of rounding v on the min-max grid fitted to it,

    err(v) = Σ_i ((q(v_i) − v_i) / U_ii)²,  q on the grid lo = min(0, min v), hi = max(0, max v),
             scale = (hi − lo) / maxq (1 where 0), zero = −lo / scale, codes clip(rint(v / scale + zero), 0, maxq)

and the gain of leaving weight k out (kept exact, the grid fitted to the others) is err(v) − err(v without k).
spqr.py's `leave_one_out_gain` computes the same with NumPy for any grid fit, materializing each row n times
without one weight: 19 s of SpQR's quantization of two OPT-1.3b-wide layers (1792 groups of 16 columns).
The loop runs on the calling thread: it is called between the column loop's BLAS products, whose OpenBLAS
workers keep spinning on the other cores (a parallel E8P encoder lost 6x there). The arithmetic is float32
as in NumPy; only the order of the sums differs (tests/test_spqr.py compares the two).
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def _error(v, u, maxq, skip):
    """err(v without weight `skip`) (module docstring) of one row v [n] (skip = -1: every weight)."""
    lo, hi = np.float32(0), np.float32(0)
    for i in range(v.shape[0]):
        if i != skip:
            lo = min(lo, v[i])
            hi = max(hi, v[i])
    scale = np.float32((hi - lo) / maxq)
    if scale == 0:
        scale = np.float32(1)
    zero = np.float32(-lo / scale)
    total = np.float32(0)
    for i in range(v.shape[0]):
        if i != skip:
            code = min(max(np.float32(np.rint(v[i] / scale + zero)), np.float32(0)), maxq)
            e = ((code - zero) * scale - v[i]) / u[i]
            total += e * e
    return total


@njit(cache=True)
def minmax_leave_one_out_gain(w, u, maxq):
    """gain [rows, n] float32 of leaving each weight of w [rows, n] float32 out of its row's min-max grid,
    u [n] float32 the U_kk of the columns, maxq the largest code (module docstring)."""
    rows, n = w.shape
    gain = np.empty((rows, n), dtype=np.float32)  # [rows, n]
    top = np.float32(maxq)
    for r in range(rows):
        baseline = _error(w[r], u, top, -1)
        for k in range(n):
            gain[r, k] = baseline - _error(w[r], u, top, k)
    return gain
