"""Activation quantization for integer matvec kernels: int8 per block of 32, one float scale each.

The activation side of llama.cpp's Q8_0 block format (ggml-quants.c,
`quantize_row_q8_0`): a block of 32 values x is stored as

    d = max|x| / 127        q[k] = rint(x[k] / d)   (0 when d = 0)     x[k] ~ d * q[k]

so |q| <= 127 and a product of an unsigned code (< 2**8) with q fits the
CPU's u8 x s8 dot-product instructions. The division is done as a multiply
by 1/d, in float32, without fastmath: NumPy's reference
(`runtime.formats.base.quantize_activation`) repeats the same float32
operations and gets the same q bit for bit.
"""
from __future__ import annotations

import numpy as np
from numba import njit

BLOCK = 32  # activations per scale (one packed run of the uniform format)


@njit(cache=True)
def quantize_blocks(xs, q, d):
    """q [n*32] int8, d [n] float32 <- the Q8_0 quantization of xs [n*32] float32, block by block."""
    for b in range(d.shape[0]):
        amax = np.float32(0.0)
        for k in range(b * BLOCK, (b + 1) * BLOCK):
            amax = max(amax, abs(xs[k]))
        scale = amax / np.float32(127.0)
        inverse = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
        for k in range(b * BLOCK, (b + 1) * BLOCK):
            q[k] = np.int8(np.rint(xs[k] * inverse))
        d[b] = scale
