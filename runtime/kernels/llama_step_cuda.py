"""CuPy launchers of the Llama decode step's elementwise kernels (source: llama_step.cu).

Each takes CuPy float32 arrays and the token's position as a device array
`pos` (int32 [1]), so a step made of these launches and the products can be
captured once as a CUDA graph and replayed at every position
(runtime/cuda_graph_step.py). CuPy is imported on first use, so this module
imports on machines without a GPU.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from runtime.kernels import cuda_source

SOURCE = "llama_step.cu"
THREADS = 256  # threads per block of every kernel in llama_step.cu
DEFINES = {"THREADS": THREADS}  # llama_step.cu's constants (cuda_source.py)
MAX_HEAD_DIM = THREADS  # attend: one thread per dimension of a head


@functools.lru_cache(maxsize=None)
def _module():
    """The compiled llama_step.cu (NVRTC, once per process)."""
    return cuda_source.module(SOURCE, DEFINES)


def _blocks(n: int) -> int:
    return -(-n // THREADS)


def residual_rms_norm(x, y, weight, out, eps: float) -> None:
    """x += y (unless y is None), then out = x / sqrt(mean(x²) + eps) * weight; x, y, weight, out [d]."""
    d = x.shape[-1]
    _module().get_function("residual_rms_norm")(
        (1,), (THREADS,), (x, x if y is None else y, weight, out, np.int32(d), np.float32(eps), np.int32(y is not None)))


def rope_store(q, k, v, cos_table, sin_table, pos, k_cache, v_cache) -> None:
    """RoPE at position pos[0] on q [H*hd] (in place) and k [KV*hd]; k and v written into the layer's cache
    [KV, max_len, hd] at that position. cos_table, sin_table: [n, hd/2] with n > pos[0]."""
    n_kv, max_len, hd = k_cache.shape
    n_heads = q.size // hd
    n = (n_heads + n_kv) * (hd // 2) + n_kv * hd
    _module().get_function("rope_store")(
        (_blocks(n),), (THREADS,), (q, k, v, cos_table, sin_table, pos, k_cache, v_cache, np.int32(n_heads),
                                    np.int32(n_kv), np.int32(hd), np.int32(max_len)))


def attend(q, k_cache, v_cache, pos, scores, out) -> None:
    """out [H*hd] = softmax(q_h K[:pos+1]ᵀ / sqrt(hd)) V[:pos+1] per query head h (grouped-query: kv head
    h // (H / KV)); k_cache, v_cache [KV, max_len, hd]; scores: scratch [H, max_len] float32."""
    n_kv, max_len, hd = k_cache.shape
    n_heads = q.size // hd
    _module().get_function("attend")(
        (n_heads,), (THREADS,), (q, k_cache, v_cache, pos, scores, out, np.int32(n_heads // n_kv), np.int32(hd),
                                 np.int32(max_len), np.float32(1.0 / math.sqrt(hd))))


def silu_mul(gate, up, out) -> None:
    """out = silu(gate) * up, all [n]."""
    n = gate.size
    _module().get_function("silu_mul")((_blocks(n),), (THREADS,), (gate, up, out, np.int32(n)))
