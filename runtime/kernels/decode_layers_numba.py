"""The layers of one decode step (one token) of a Llama or an OPT in a single Numba call, for a model whose every
layer product is one prepared kernel call of one kind: uniform_int8_numba's (RTN, GPTQ, NF4, FP4, SpQR: the formats
whose `one_row_product` is that call alone), e8p_numba's (QuIP#) or int8_numba's (LLM.int8, absmax,
SmoothQuant: one call per part) or incoherent_numba's (QuIP: each part's transforms around one uniform call with an
input per part).

model.py's `llama_decode_layers` runs a layer as a dozen calls from Python (two RMSNorms, four products, RoPE
twice, attention with the cache write, SiLU·up, two residual adds), and each call pays Numba's dispatch: 1-3 us
for an elementwise kernel, 5 us for a product (twenty arguments typed one by one, the output split). For
SmolLM2's 30 layers that was 1.2 ms of a 4.8 ms token. `run_layers` makes the same kernel calls in the same
order from Numba (`rms_norm`, `rope`, `attend`, `silu_mul` of runtime/kernels/decode_step_numba.py; each product
through the kind's `matvec_threads` or `decode_int8_prepared`), so its output equals the Python loop's;
`run_opt_layers` does the same for OPT's layers (model.py's `opt_decode_step`: LayerNorms before or after each
half, ReLU). Biases are added after their product, as runtime/linear.py does. The final norm and the head stay
in Python (one product a token).

The prepared calls go in as typed lists, one per argument slot of the product kind (`LayerCalls`), their scalar
arguments as rows of an integer and a float table: a typed list is one argument whose type Numba reads without
looking at its items, so the whole step dispatches once; and once typed, the step is called through its compiled
code (numba_common.DirectCalls): Numba's dispatcher typed the twenty lists again on every call, 0.1-0.25 ms of a
SmolLM2 token.
"""
from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, types
from numba.extending import overload
from numba.typed import List

from runtime.kernels import e8p_numba, incoherent_numba, int8_numba, uniform_int8_numba
from runtime.kernels.decode_step_numba import attend, layer_norm, rms_norm, rope, silu_mul
from runtime.kernels.numba_common import DirectCalls

PRODUCTS_PER_LAYER = 4  # q/k/v, o, gate/up, down (OPT: q/k/v, out, fc1, fc2): model.py's *_DECODE_PRODUCTS
MAX_PARTS = 3  # parts of one product (q/k/v), in every kind
# the columns of LayerCalls.ints, every kind: the parts, each part's offset in the product's output and its
# out_features (0 past the parts), then the kind's own
PARTS, OFFSET, OUT = 0, 1, 1 + MAX_PARTS
# uniform_int8_numba's: the tile variant, bits, group runs, whether the product runs in parallel
VARIANT, BITS, GROUP_RUNS, PARALLEL = range(1 + 2 * MAX_PARTS, 5 + 2 * MAX_PARTS)
# e8p_numba's: the input's Hadamard size, the stages, whether the CPU has VBMI, each part's output Hadamard size
SIZE_IN, STAGES, VBMI, SIZE_OUT = range(1 + 2 * MAX_PARTS, 5 + 2 * MAX_PARTS)
# int8_numba's: whether the CPU has VNNI, whether each part runs in parallel
INT8_VNNI, INT8_PARALLEL = 1 + 2 * MAX_PARTS, 2 + 2 * MAX_PARTS
BIASED = 1 + 2 * MAX_PARTS + 3 + MAX_PARTS  # every kind: whether the product adds a bias (LayerCalls.biases)
INT_COLUMNS = BIASED + 1
# uniform_int8_numba's: blocked, scales, zeros of each part slot, perm, lut, then each part slot's outliers (CSR
# row_ptr, col_idx, values)
UNIFORM_SLOTS = 3 * MAX_PARTS + 2 + 3 * MAX_PARTS
# e8p_numba's: h_in, the byte and coordinate tables of both stages, then each part slot's signs in, signs out,
# output Hadamard factor, codes of the first and last stage (its stage scales: LayerCalls.floats)
E8P_SHARED, E8P_PER_PART = 5, 5
INT8_SLOTS = 2 * MAX_PARTS  # int8_numba's: the int8 weight of each part slot, then each one's row scales
# incoherent_numba's: the inner call's UNIFORM_SLOTS, then the six arrays of a RowTransform (scale, add, first, left,
# right, dest), each for the three part slots, of the input transforms and then of the output transforms
TRANSFORM_FIELDS = 6
INTO_SLOT, BACK_SLOT = UNIFORM_SLOTS, UNIFORM_SLOTS + TRANSFORM_FIELDS * MAX_PARTS
INCOHERENT_SLOTS = BACK_SLOT + TRANSFORM_FIELDS * MAX_PARTS


class LayerCalls(NamedTuple):
    """The prepared calls of every layer's products (`prepare`), as `run_layers` takes them."""
    ints: np.ndarray  # int64 [layers * 4, INT_COLUMNS]: the columns above
    floats: np.ndarray  # float32 [layers * 4, 2 * MAX_PARTS]: E8P's stage scales (first, last) of each part;
    #                     int8's outlier threshold of each part (-1: none)
    arrays: tuple  # typed lists [layers * 4], one per argument slot of the kind
    norms: np.ndarray  # float32 [layers, 2, d]: the weights of a layer's two norms (attention's, then the MLP's)
    norm_biases: np.ndarray  # float32 [layers, 2, d]: OPT's LayerNorm biases (zeros for a Llama)
    biases: np.ndarray  # float32 [layers * 4, width]: each product's bias, its parts' one after another (width 1 and
    #                     zeros where no product has one); BIASED says which products add theirs
    direct: DirectCalls  # calls run_layers / run_opt_layers without typing the typed lists again every step


def prepare(calls: list, norms, biases: list, norm_biases=None) -> LayerCalls | None:
    """LayerCalls of `calls` (four per layer in the order of model.py's LLAMA_DECODE_PRODUCTS or
    OPT_DECODE_PRODUCTS, each a uniform_int8_numba.PreparedCall, an e8p_numba.int8_parts_call, a list of
    int8_numba.matvec_arguments, an incoherent_numba.TransformedCall, or None: `PackedTensor.prepared_call`), or
    None where one is missing, the kinds differ, or an argument slot's arrays differ in type from layer to layer
    (a typed list holds one type). biases: per product its parts' biases concatenated [outs] float32, or None;
    norms, norm_biases [layers, 2, d] (arrays or nested lists; norm_biases None: zeros, a Llama's RMSNorms)."""
    if any(call is None for call in calls):
        return None
    kinds = {_kind(call) for call in calls}
    if len(kinds) > 1:
        return None
    row, n_slots = {"uniform": (_uniform_row, UNIFORM_SLOTS), "int8": (_int8_row, INT8_SLOTS),
                    "incoherent": (_incoherent_row, INCOHERENT_SLOTS),
                    "e8p": (_e8p_row, E8P_SHARED + MAX_PARTS * E8P_PER_PART)}[kinds.pop()]
    ints = np.zeros((len(calls), INT_COLUMNS), dtype=np.int64)  # [products, INT_COLUMNS]
    floats = np.zeros((len(calls), 2 * MAX_PARTS), dtype=np.float32)  # [products, 2 * MAX_PARTS]
    slots = [[] for _ in range(n_slots)]
    for p, call in enumerate(calls):
        for slot, array in zip(slots, row(call, ints[p], floats[p])):
            slot.append(array)
    if any(len({numba.typeof(a) for a in slot}) > 1 for slot in slots):
        return None
    table = np.zeros((len(calls), max([1] + [len(b) for b in biases if b is not None])), dtype=np.float32)
    for p, bias in enumerate(biases):
        if bias is not None:
            ints[p, BIASED], table[p, :len(bias)] = 1, bias
    norms = np.asarray(norms, dtype=np.float32)  # [layers, 2, d]
    norm_biases = np.zeros_like(norms) if norm_biases is None else np.asarray(norm_biases, dtype=np.float32)
    return LayerCalls(ints, floats, tuple(_typed_list(tuple(slot)) for slot in slots), norms, norm_biases, table,
                      DirectCalls())


def _kind(call) -> str:
    """The kind of a prepared call: "uniform", "int8" (a list of int8_numba.matvec_arguments), "incoherent" or
    "e8p"."""
    if isinstance(call, uniform_int8_numba.PreparedCall):
        return "uniform"
    if isinstance(call, incoherent_numba.TransformedCall):
        return "incoherent"
    return "int8" if isinstance(call, list) else "e8p"


def _uniform_row(call, ints: np.ndarray, floats: np.ndarray) -> tuple:
    """Fill a product's row of the integer table from a uniform PreparedCall (floats: unused); its arrays, one
    per slot."""
    variant, n_parts, *weights = call.head
    perm, bits, group_runs, lut = call.tail
    ints[PARTS], ints[OUT:OUT + n_parts] = n_parts, call.outs
    ints[OFFSET:OFFSET + n_parts] = uniform_int8_numba.part_starts(call.outs)
    ints[[VARIANT, BITS, GROUP_RUNS, PARALLEL]] = variant, bits, group_runs, call.parallel
    return (*weights, perm, lut, *call.outliers)


def _incoherent_row(call, ints: np.ndarray, floats: np.ndarray) -> tuple:
    """Fill a product's row of the integer table from an incoherent_numba.TransformedCall (its inner call's, as
    `_uniform_row`); its arrays, one per slot (unused part slots repeat the first part's transforms)."""
    transforms = call.transforms + (call.transforms[0],) * (MAX_PARTS - len(call.transforms))
    return _uniform_row(call.inner, ints, floats) + tuple(
        part[side][field] for side in range(2) for field in range(TRANSFORM_FIELDS) for part in transforms)


def _int8_row(call, ints: np.ndarray, floats: np.ndarray) -> tuple:
    """Fill a product's rows of the integer and float tables from its parts' int8_numba.matvec_arguments; its
    arrays, one per slot (unused part slots repeat the first part)."""
    ends = np.cumsum([0] + [qweight.shape[0] for qweight, *_ in call])
    n_parts = len(call)
    ints[PARTS], ints[OFFSET:OFFSET + n_parts], ints[OUT:OUT + n_parts] = n_parts, ends[:-1], np.diff(ends)
    ints[INT8_VNNI] = call[0][3]
    slots = call + [call[0]] * (MAX_PARTS - n_parts)
    for j, (_, _, threshold, _, parallel) in enumerate(slots):
        ints[INT8_PARALLEL + j], floats[j] = parallel, threshold
    return tuple(qweight for qweight, *_ in slots) + tuple(sw for _, sw, *_ in slots)


def _e8p_row(call, ints: np.ndarray, floats: np.ndarray) -> tuple:
    """Fill a product's rows of the integer and float tables from an e8p_numba.int8_parts_call; its arrays, one
    per slot."""
    (n_parts, h_in, size_in, n_stages, *tables, vbmi), part_slots = call
    arrays = [h_in, *tables]
    ends = np.cumsum([0] + [part[1].shape[0] for part in part_slots[:n_parts]])  # signs_out [out] of each
    ints[PARTS], ints[OFFSET:OFFSET + n_parts], ints[OUT:OUT + n_parts] = n_parts, ends[:-1], np.diff(ends)
    ints[[SIZE_IN, STAGES, VBMI]] = size_in, n_stages, vbmi
    for j, (signs_in, signs_out, h_out, size_out, codes_1, codes_2, scale_1, scale_2) in enumerate(part_slots):
        ints[SIZE_OUT + j], floats[j], floats[MAX_PARTS + j] = size_out, scale_1, scale_2
        arrays += [signs_in, signs_out, h_out, codes_1, codes_2]
    return tuple(arrays)


def _typed_list(arrays: tuple):
    """A typed list of the arrays of a tuple, filled by cached Numba functions (a typed list filled from
    Python compiles its methods for the item type in every process: 1 s and 20 MB for a model's eleven slots;
    one Numba function looping over the tuple compiled a case per item, 14 s the first time)."""
    items = _list_of(arrays[0])
    for array in arrays[1:]:
        _append(items, array)
    return items


@njit(cache=True)
def _list_of(first):
    """A typed list holding `first`."""
    items = List()
    items.append(first)
    return items


@njit(cache=True)
def _append(items, item):
    """items.append(item) for a typed list."""
    items.append(item)


def run(calls: LayerCalls, x: np.ndarray, keys: np.ndarray, values: np.ndarray, position: int, cos: np.ndarray,
        sin: np.ndarray, head_dim: int, eps: float) -> np.ndarray:
    """A Llama's hidden state [d] after every layer for the token embedding x [d] float32 at `position` (its key
    and value written into keys, values [layers, kv heads, max_len, hd]); cos, sin [hd/2] the position's angles."""
    return calls.direct(run_layers, x, position, cos, sin, head_dim, np.float32(eps), keys, values, calls.norms,
                        calls.ints, calls.floats, calls.biases, numba.get_num_threads(), calls.arrays)


def run_opt(calls: LayerCalls, x: np.ndarray, keys: np.ndarray, values: np.ndarray, position: int,
            pre_norm: bool, eps: float) -> np.ndarray:
    """An OPT's hidden state [d] after every layer for the token's input x [d] float32 (embedding and learned
    position) at `position`, its key and value written into keys, values; LayerNorms before each half
    (`pre_norm`) or after it."""
    return calls.direct(run_opt_layers, x, position, pre_norm, np.float32(eps), keys, values, calls.norms,
                        calls.norm_biases, calls.ints, calls.floats, calls.biases, numba.get_num_threads(),
                        calls.arrays)


def _product(p, x, ints, floats, threads, weights):
    """y [the parts' outputs at their offsets] of prepared call p for the input x [in]: the kind's kernel, picked
    by Numba from the argument slots in `weights` (`_product_kind`; runs only through `run_layers`)."""
    raise NotImplementedError("called from Numba only")


@overload(_product)
def _product_kind(p, x, ints, floats, threads, weights):
    """`_product` for the slots of each kind, told apart by the dtype of the first: int8_numba's int8 weights;
    uniform_int8_numba's int32 blocked codes (incoherent_numba's calls: the same, then INCOHERENT_SLOTS in
    all); else e8p_numba's float32 Hadamard factors."""
    if weights[0].item_type.dtype == types.int8:
        def int8(p, x, ints, floats, threads, weights):
            w0, w1, w2, s0, s1, s2 = weights
            qweights, scales = (w0, w1, w2), (s0, s1, s2)
            y = _outputs(ints, p)  # [outs]
            for j in range(ints[p, PARTS]):
                _part(y, ints, p, j)[:] = int8_numba.matvec_threads(
                    qweights[j][p], scales[j][p], x, floats[p, j], ints[p, INT8_VNNI] != 0,
                    threads if ints[p, INT8_PARALLEL + j] else 1)
            return y
        return int8

    if weights[0].item_type.dtype == types.int32 and len(weights) == INCOHERENT_SLOTS:
        def incoherent(p, x, ints, floats, threads, weights):
            n_parts = ints[p, PARTS]
            into, back = _transforms(weights[INTO_SLOT:BACK_SLOT]), _transforms(weights[BACK_SLOT:])
            x_in = np.empty((n_parts, x.shape[0]), dtype=np.float32)  # [parts, in] V x D⁻¹ of each part
            for j in range(n_parts):
                x_in[j] = _transform(x, into, j, p, x[:0])
            y = _uniform_call(p, x_in, ints, threads, weights)  # [tiles of all parts * TILE]
            out = np.empty_like(y)  # [tiles of all parts * TILE]
            for j in range(n_parts):
                _part(out, ints, p, j)[:] = _transform(_part(y, ints, p, j), back, j, p, x_in[j])
            return out
        return incoherent

    if weights[0].item_type.dtype == types.int32:
        def uniform(p, x, ints, floats, threads, weights):
            return _uniform_call(p, x.reshape(1, -1), ints, threads, weights)
        return uniform

    def e8p(p, x, ints, floats, threads, weights):
        (h_in, table, tables, table_2, tables_2, in_0, out_0, h_0, first_0, last_0, in_1, out_1, h_1, first_1,
         last_1, in_2, out_2, h_2, first_2, last_2) = weights
        n_parts = ints[p, PARTS]
        y = _outputs(ints, p)  # [outs]
        e8p_numba.decode_int8_prepared(
            x, n_parts, h_in[p], ints[p, SIZE_IN], ints[p, STAGES], table[p], tables[p], table_2[p], tables_2[p],
            ints[p, VBMI] != 0,
            in_0[p], out_0[p], h_0[p], ints[p, SIZE_OUT], first_0[p], last_0[p], floats[p, 0],
            floats[p, MAX_PARTS], _part(y, ints, p, 0),
            in_1[p], out_1[p], h_1[p], ints[p, SIZE_OUT + 1], first_1[p], last_1[p], floats[p, 1],
            floats[p, MAX_PARTS + 1], _part(y, ints, p, min(1, n_parts - 1)),
            in_2[p], out_2[p], h_2[p], ints[p, SIZE_OUT + 2], first_2[p], last_2[p], floats[p, 2],
            floats[p, MAX_PARTS + 2], _part(y, ints, p, min(2, n_parts - 1)))
        return y
    return e8p


@njit(inline="always")
def _biased_product(p, x, ints, floats, biases, threads, weights):
    """`_product`, then each part's bias added in place where product p has one (`y += b`, as runtime/linear.py
    adds it)."""
    y = _product(p, x, ints, floats, threads, weights)
    if ints[p, BIASED]:
        at = 0
        for j in range(ints[p, PARTS]):
            part = _part(y, ints, p, j)
            part += biases[p, at:at + part.shape[0]]
            at += part.shape[0]
    return y


@njit(inline="always")
def _uniform_call(p, x, ints, threads, weights):
    """y [tiles of all parts * TILE] of uniform call p (its arrays the first UNIFORM_SLOTS of weights) for x
    [1 or parts, in]."""
    b0, s0, z0, b1, s1, z1, b2, s2, z2, perms, luts, r0, c0, v0, r1, c1, v1, r2, c2, v2 = weights[:UNIFORM_SLOTS]
    return uniform_int8_numba.matvec_threads(
        ints[p, VARIANT], ints[p, PARTS], b0[p], s0[p], z0[p], b1[p], s1[p], z1[p], b2[p], s2[p], z2[p], x,
        perms[p], ints[p, BITS], ints[p, GROUP_RUNS], luts[p], threads if ints[p, PARALLEL] else 1,
        r0[p], c0[p], v0[p], r1[p], c1[p], v1[p], r2[p], c2[p], v2[p])


@njit(inline="always")
def _transforms(w):
    """The RowTransform fields of the three part slots from their 18 typed lists: six tuples of three (scale,
    add, first, left, right, dest)."""
    return ((w[0], w[1], w[2]), (w[3], w[4], w[5]), (w[6], w[7], w[8]), (w[9], w[10], w[11]),
            (w[12], w[13], w[14]), (w[15], w[16], w[17]))


@njit(inline="always")
def _transform(v, fields, part, p, shift_of):
    """Part `part`'s transform of product p (`_transforms`) of one row v [n]: incoherent_numba.transform_row."""
    scale, add, first, left, right, dest = fields
    return incoherent_numba.transform_row(v, scale[part][p], add[part][p], shift_of, first[part][p],
                                          left[part][p], right[part][p], dest[part][p])


@njit(inline="always")
def _outputs(ints, p):
    """An empty output [to the last part's end] of call p."""
    last = ints[p, PARTS] - 1
    return np.empty(ints[p, OFFSET + last] + ints[p, OUT + last], dtype=np.float32)


@njit(inline="always")
def _part(y, ints, p, part):
    """The outputs of part `part` of call p in its output y (a view)."""
    start = ints[p, OFFSET + part]
    return y[start:start + ints[p, OUT + part]]


@njit(cache=True)
def run_layers(x, position, cos, sin, head_dim, eps, keys, values, norms, ints, floats, biases, threads, weights):
    """`run`: per layer, x += o(attention(rope(q), rope(k), v)) with q/k/v of rms_norm(x), then
    x += down(silu(gate) * up) with gate/up of rms_norm(x), as model.py's `llama_decode_layers`."""
    for i in range(norms.shape[0]):
        p = PRODUCTS_PER_LAYER * i
        y = _biased_product(p, rms_norm(x, norms[i, 0], eps), ints, floats, biases, threads, weights)  # [q/k/v]
        q, k = _part(y, ints, p, 0), _part(y, ints, p, 1)  # [H*hd], [KV*hd]
        rope(q, head_dim, cos, sin)
        rope(k, head_dim, cos, sin)
        o = attend(q, k, _part(y, ints, p, 2), keys[i], values[i], position)  # [H*hd]
        h = x + _part(_biased_product(p + 1, o, ints, floats, biases, threads, weights), ints, p + 1, 0)  # [d]
        y = _biased_product(p + 2, rms_norm(h, norms[i, 1], eps), ints, floats, biases, threads, weights)  # [g/u]
        a = silu_mul(_part(y, ints, p + 2, 0), _part(y, ints, p + 2, 1))  # [ffn]
        x = h + _part(_biased_product(p + 3, a, ints, floats, biases, threads, weights), ints, p + 3, 0)  # [d]
    return x


@njit(cache=True)
def run_opt_layers(x, position, pre_norm, eps, keys, values, norms, norm_biases, ints, floats, biases, threads,
                   weights):
    """`run_opt`: per layer, h = x + out(attention(q, k, v)) with q/k/v of LN(x) (pre-LN; post-LN: of x, and LN
    after the add), then x = h + fc2(relu(fc1(LN(h)))) (post-LN: of h, LN after), as model.py's
    `opt_decode_step`."""
    for i in range(norms.shape[0]):
        p = PRODUCTS_PER_LAYER * i
        a = layer_norm(x, norms[i, 0], norm_biases[i, 0], eps) if pre_norm else x  # [d]
        y = _biased_product(p, a, ints, floats, biases, threads, weights)  # [q/k/v outputs]
        o = attend(_part(y, ints, p, 0), _part(y, ints, p, 1), _part(y, ints, p, 2), keys[i], values[i],
                   position)  # [H*hd]
        h = x + _part(_biased_product(p + 1, o, ints, floats, biases, threads, weights), ints, p + 1, 0)  # [d]
        h = h if pre_norm else layer_norm(h, norms[i, 0], norm_biases[i, 0], eps)  # [d]
        n = layer_norm(h, norms[i, 1], norm_biases[i, 1], eps) if pre_norm else h  # [d]
        f = _part(_biased_product(p + 2, n, ints, floats, biases, threads, weights), ints, p + 2, 0)  # [ffn]
        f = np.maximum(f, np.float32(0.0))  # ReLU  [ffn]
        out = h + _part(_biased_product(p + 3, f, ints, floats, biases, threads, weights), ints, p + 3, 0)  # [d]
        x = out if pre_norm else layer_norm(out, norms[i, 1], norm_biases[i, 1], eps)  # [d]
    return x
