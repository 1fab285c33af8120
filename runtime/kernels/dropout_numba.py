"""Inverted-dropout masks (Srivastava et al. 2014) drawn from a counter-based hash, for LoRA's dropout in
training (pipeline/training/backward.py).

Entry i of the mask for a stream `key` keeps its input (value 1 / (1 - p)) unless the top 24 bits of
SplitMix64(key + i) fall below round(p · 2^24), where SplitMix64 is Steele, Lea and Flood's finalizer
(2014, "Fast splittable pseudorandom number generators"; the mixing constants of Stafford's Mix13). Each
entry is a function of (key, i) alone: the recomputation of a layer in the backward pass draws the same
mask without storing it, the loop vectorizes, and a mask costs about a tenth of NumPy's PCG64 floats of
the same size. p is rounded to a multiple of 2^-24 (6e-8).
"""
from __future__ import annotations

import numpy as np
from numba import njit

PROBABILITY_BITS = 24  # a kept entry: the hash's top 24 bits at or above round(p * 2^24)


@njit(inline="always")
def splitmix64(x):
    """SplitMix64's output function of the uint64 x (module docstring)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True)
def _fill_mask(key, threshold, scale, out):
    """out[i] = scale, or 0 where the top bits of splitmix64(key + i) are below threshold (out flat float32)."""
    for i in range(out.shape[0]):
        drawn = splitmix64(key + np.uint64(i)) >> np.uint64(64 - PROBABILITY_BITS)
        out[i] = scale if drawn >= threshold else np.float32(0.0)


def stream_key(*numbers: int) -> int:
    """A uint64 stream key from non-negative integers (seed, layer, projection, ...), each hashed in turn."""
    key = np.uint64(0)
    for n in numbers:
        key = splitmix64(key ^ np.uint64(n))
    return int(key)


def dropout_mask(shape: tuple, key: int, p: float) -> np.ndarray:
    """float32 [shape]: 0 with probability p (rounded to 2^-24), else 1 / (1 - p); a function of `key`."""
    out = np.empty(int(np.prod(shape)), dtype=np.float32)  # [prod(shape)]
    _fill_mask(np.uint64(key), np.uint64(round(p * (1 << PROBABILITY_BITS))), np.float32(1 / (1 - p)), out)
    return out.reshape(shape)
