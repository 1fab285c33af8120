"""GPTQ's column loop inside one block, on per-row grids, with SpQR's outliers: one Numba loop over a run of
columns (Frantar et al. 2022, "GPTQ", Algorithm 1; Dettmers et al. 2023, "SpQR", Algorithm 1's outliers;
gptq.py's `obs_columns` holds the algorithm and calls this between its group fits).

The block's columns are the rows of W1 [B, out] (float32, updated in place). For each column i of the run,
at permuted position j = b1 + i, group g = group_of[j], grid (s, z) = (scales[g, o], zeros[g, o]) of row o:

    code = clip(rint(w / s) + z, 0, maxq)      (GPTQ's rounding: integer zero; `gptq_rounding`)
         = clip(rint(w / s + z), 0, maxq)      (SpQR's min-max grid with an unrounded zero)
    q    = (code − z) · s
    an outlier (SpQR, where thresholds has one entry per row): ((w − q) / U_jj)² > threshold[o] ->
         code of 0, q = w rounded to float16, outlier_mask[o] set
    e    = (w − q) / U_jj,   W1[r] −= U[j, b1 + r] · e  for the rows r > i of the block

in float32 with the roundings of the NumPy code it replaced (the grids' former per-column `quantize` and
`obs_columns`' rank-1 update, kept as the reference in tests/test_gptq_columns_kernel.py): the same codes,
values and errors, bit for bit; tests/test_gptq.py and tests/test_spqr.py run it end to end. The
NumPy loop spent about 0.3 ms of calls and temporaries per column (the grid, the outlier test, np.outer and
the update): 5.7 s of SpQR's 20 s on one OPT-1.3b layer. It runs on the calling thread, between BLAS
products whose OpenBLAS workers keep spinning on the other cores (runtime/kernels/leave_one_out_numba.py).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

HALF_MAX = 65504.0  # the largest finite float16
HALF_MIN_NORMAL_EXPONENT = -13  # frexp's exponent of 2^-14, float16's smallest normal number


@njit(cache=True)
def to_half(value):
    """float32 `value` rounded to the nearest float16 (ties to even), as NumPy's astype(np.float16):
    11 significant bits for normal halves, steps of 2^-24 below them, infinity past HALF_MAX."""
    x = np.float64(value)
    if x == 0 or not math.isfinite(x):
        return np.float32(value)
    mantissa, exponent = math.frexp(x)  # x = mantissa 2^exponent, 0.5 <= |mantissa| < 1
    if exponent < HALF_MIN_NORMAL_EXPONENT:
        rounded = np.rint(x * 2.0 ** 24) * 2.0 ** -24  # subnormal halves: a fixed step
    else:
        rounded = math.ldexp(np.rint(math.ldexp(mantissa, 11)), exponent - 11)
    if abs(rounded) > HALF_MAX:
        rounded = math.copysign(math.inf, x)
    return np.float32(rounded)


@njit(cache=True)
def round_columns(W1, E1, codes1, Q1, U, b1, i0, i1, group_of, scales, zeros, maxq, gptq_rounding, thresholds,
                  outlier_mask):
    """Columns i0 .. i1-1 of the block that starts at position b1 (module docstring): W1 [B, out] float32
    updated, E1 [B, out] scaled errors, codes1 [B, out] uint8, Q1 [B, out] float32 written; U [in, in]
    float32; scales, zeros [n_groups, out] float32; thresholds [out] float64 (empty: no outliers);
    outlier_mask [out, in] bool (written where thresholds is given)."""
    n_rows, n_out = W1.shape
    find_outliers = thresholds.shape[0] > 0
    top = np.float32(maxq)
    for i in range(i0, i1):
        j = b1 + i
        g = group_of[j]
        u = U[j, j]
        for o in range(n_out):
            w = W1[i, o]
            s, z = scales[g, o], zeros[g, o]
            if gptq_rounding:
                code = min(max(np.float32(np.rint(w / s)) + z, np.float32(0)), top)
            else:
                code = min(max(np.float32(np.rint(w / s + z)), np.float32(0)), top)
            q = (code - z) * s
            if find_outliers:
                d = (w - q) / u
                if np.float64(d * d) > thresholds[o]:
                    code = min(max(np.float32(np.rint(z)), np.float32(0)), top)  # the code of a zero weight
                    q = to_half(w)
                    outlier_mask[o, j] = True
            codes1[i, o] = np.uint8(code)
            Q1[i, o] = q
            E1[i, o] = (w - q) / u
        for r in range(i + 1, n_rows):
            coef = U[j, b1 + r]
            for o in range(n_out):
                W1[r, o] -= coef * E1[i, o]
