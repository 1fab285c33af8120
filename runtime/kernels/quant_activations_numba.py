"""Activation quantization for integer matvec kernels: int8 per block of 32, one float scale each.

The activation side of llama.cpp's Q8_0 block format (ggml-quants.c,
`quantize_row_q8_0`): a block of 32 values x is stored as

    d = max|x| / 127        q[k] = rint(x[k] / d)   (0 when d = 0)     x[k] ~ d * q[k]

so |q| <= 127 and a product of an unsigned code (< 2**8) with q fits the
CPU's u8 x s8 dot-product instructions. Prefill's integer kernel keeps
float-like accuracy with two bytes per activation: d = max|x| / 32639 and
q = 256 hi + lo, hi and lo signed bytes (|hi| <= 127 since 32639 + 128 < 128 * 256),
each multiplied by its own byte dot product (runtime/kernels/uniform_prefill_numba.py). The division is done as a multiply
by 1/d, in float32, without fastmath: NumPy's reference
(`runtime.formats.base.quantize_activation`) repeats the same float32
operations and gets the same q bit for bit.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from runtime.kernels.numba_common import float_from_bits

BLOCK = 32  # activations per scale (one packed run of the uniform format)
LEVELS8 = 127  # Q8_0: one signed byte per activation
LEVELS16 = 127 * 257  # two signed bytes: q = 256 hi + lo, hi = (q + 128) >> 8 in [-127, 127], lo in [-128, 127]


@njit(cache=True)
def quantize_blocks(xs, q, d, levels=LEVELS8):
    """q [n*32], d [n] float32 <- the quantization of xs [n*32] float32 to integers in [-levels, levels],
    block by block (levels LEVELS8: Q8_0, q int8; LEVELS16: two bytes, q int16)."""
    magnitude = xs.view(np.int32)  # [n*32] the float bits: |x| orders as bits & 0x7FFFFFFF, an integer max
    for b in range(d.shape[0]):  # (which LLVM vectorizes; a float max without fastmath it does not)
        top = np.int32(0)
        for k in range(b * BLOCK, (b + 1) * BLOCK):
            top = max(top, magnitude[k] & np.int32(0x7FFFFFFF))
        scale = float_from_bits(top) / np.float32(levels)
        inverse = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
        for k in range(b * BLOCK, (b + 1) * BLOCK):
            q[k] = np.rint(xs[k] * inverse)
        d[b] = scale
