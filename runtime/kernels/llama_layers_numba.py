"""The layers of one Llama decode step (one token) in a single Numba call, for a model whose every layer product
is one prepared int8-activation call of runtime/kernels/uniform_int8_numba.py (RTN, GPTQ, NF4 and FP4 weights:
the formats whose `one_row_product` is that call alone, without SpQR's outliers).

model.py's `llama_decode_step` runs a layer as a dozen calls from Python (two RMSNorms, four products, RoPE twice,
attention with the cache write, SiLU·up, two residual adds), and each call pays Numba's dispatch: 1-3 us for an
elementwise kernel, 5 us for a product (twenty arguments typed one by one, the output split). For SmolLM2's 30
layers that was 1.2 ms of a 4.8 ms token. `run_layers` makes the same kernel calls in the same order from Numba
(`rms_norm`, `rope`, `attend`, `silu_mul` of runtime/kernels/decode_step_numba.py; each product through
uniform_int8_numba's `matvec_threads`), so its output equals the Python loop's bit for bit. The final norm and the
head stay in Python (one product a token).

The prepared calls go in as typed lists, one per argument slot of the product (`LayerCalls`): a typed list is
one argument whose type Numba reads without looking at its items, so the whole step dispatches once.
"""
from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit
from numba.typed import List

from runtime.kernels.decode_step_numba import attend, rms_norm, rope, silu_mul
from runtime.kernels.uniform_int8_numba import MAX_PARTS, TILE, matvec_threads

PRODUCTS_PER_LAYER = 4  # q/k/v, o, gate/up, down: model.py's LLAMA_DECODE_PRODUCTS
# the columns of LayerCalls.ints
VARIANT, PARTS, BITS, GROUP_RUNS, PARALLEL, OFFSET, OUT = 0, 1, 2, 3, 4, 5, 5 + MAX_PARTS
INT_COLUMNS = 5 + 2 * MAX_PARTS


class LayerCalls(NamedTuple):
    """The prepared calls of every layer's products (`prepare`), as `run_layers` takes them."""
    ints: np.ndarray  # int64 [layers * 4, INT_COLUMNS]: variant, parts, bits, group runs, parallel, each part's
    #                   offset in the call's output, each part's out_features (0 past the parts)
    arrays: tuple  # typed lists [layers * 4]: blocked, scales, zeros of each of MAX_PARTS slots, then perm, lut
    norms: np.ndarray  # float32 [layers, 2, d]: the input and post-attention RMSNorm weights


def prepare(calls: list, norms: np.ndarray) -> LayerCalls | None:
    """LayerCalls of `calls` (uniform_int8_numba.PreparedCall or None, four per layer in the order of
    LLAMA_DECODE_PRODUCTS), or None where one is missing, has outliers, or an argument slot's arrays differ in
    type from layer to layer (a typed list holds one type)."""
    if any(call is None or call.outliers for call in calls):
        return None
    ints = np.zeros((len(calls), INT_COLUMNS), dtype=np.int64)  # [products, INT_COLUMNS]
    slots = [[] for _ in range(3 * MAX_PARTS + 2)]
    for p, call in enumerate(calls):
        variant, n_parts, *weights = call.head
        perm, bits, group_runs, lut = call.tail
        ends = np.cumsum([0] + [-(-n // TILE) * TILE for n in call.outs])  # each part's outputs, padded to tiles
        ints[p, :OFFSET] = variant, n_parts, bits, group_runs, call.parallel
        ints[p, OFFSET:OFFSET + n_parts] = ends[:-1]
        ints[p, OUT:OUT + n_parts] = call.outs
        for slot, array in zip(slots, (*weights, perm, lut)):
            slot.append(array)
    if any(len({numba.typeof(a) for a in slot}) > 1 for slot in slots):
        return None
    return LayerCalls(ints, tuple(_typed_list(tuple(slot)) for slot in slots),
                      np.ascontiguousarray(norms, dtype=np.float32))


@njit(cache=True)
def _typed_list(arrays):
    """A typed list of the arrays of a tuple (made here, compiled once and cached: a typed list filled from
    Python compiles its methods for the item type in every process, 1 s and 20 MB for a model's eleven slots)."""
    out = List()
    for a in arrays:
        out.append(a)
    return out


def run(calls: LayerCalls, x: np.ndarray, keys: np.ndarray, values: np.ndarray, position: int, cos: np.ndarray,
        sin: np.ndarray, head_dim: int, eps: float) -> np.ndarray:
    """The hidden state [d] after every layer for the token embedding x [d] float32 at `position` (its key and
    value written into keys, values [layers, kv heads, max_len, hd]); cos, sin [hd/2] the position's angles."""
    return run_layers(x, position, cos, sin, head_dim, np.float32(eps), keys, values, calls.norms, calls.ints,
                      numba.get_num_threads(), *calls.arrays)


@njit(inline="always")
def _product(p, x, ints, threads, weights):
    """y [tiles of all parts * TILE] of prepared call p for the input x [d]; weights the typed lists of
    LayerCalls.arrays."""
    b0, s0, z0, b1, s1, z1, b2, s2, z2, perms, luts = weights
    return matvec_threads(ints[p, VARIANT], ints[p, PARTS], b0[p], s0[p], z0[p], b1[p], s1[p], z1[p], b2[p], s2[p],
                          z2[p], x.reshape(1, -1), perms[p], ints[p, BITS], ints[p, GROUP_RUNS], luts[p],
                          threads if ints[p, PARALLEL] else 1)


@njit(inline="always")
def _part(y, ints, p, part):
    """The outputs of part `part` of call p in its output y (a view)."""
    start = ints[p, OFFSET + part]
    return y[start:start + ints[p, OUT + part]]


@njit(cache=True)
def run_layers(x, position, cos, sin, head_dim, eps, keys, values, norms, ints, threads,
               b0, s0, z0, b1, s1, z1, b2, s2, z2, perms, luts):
    """`run`: per layer, x += o(attention(rope(q), rope(k), v)) with q/k/v of rms_norm(x), then
    x += down(silu(gate) * up) with gate/up of rms_norm(x), as model.py's `llama_decode_step`."""
    weights = (b0, s0, z0, b1, s1, z1, b2, s2, z2, perms, luts)
    for i in range(norms.shape[0]):
        p = PRODUCTS_PER_LAYER * i
        y = _product(p, rms_norm(x, norms[i, 0], eps), ints, threads, weights)  # [q/k/v tiles * TILE]
        q, k = _part(y, ints, p, 0), _part(y, ints, p, 1)  # [H*hd], [KV*hd]
        rope(q, head_dim, cos, sin)
        rope(k, head_dim, cos, sin)
        o = attend(q, k, _part(y, ints, p, 2), keys[i], values[i], position)  # [H*hd]
        h = x + _part(_product(p + 1, o, ints, threads, weights), ints, p + 1, 0)  # [d]
        y = _product(p + 2, rms_norm(h, norms[i, 1], eps), ints, threads, weights)  # [gate/up tiles * TILE]
        a = silu_mul(_part(y, ints, p + 2, 0), _part(y, ints, p + 2, 1))  # [ffn]
        x = h + _part(_product(p + 3, a, ints, threads, weights), ints, p + 3, 0)  # [d]
    return x
