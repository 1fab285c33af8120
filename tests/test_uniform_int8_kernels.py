"""The int8-activation kernels of the uniform format against its NumPy reference.

The reference quantizes the activation as the kernels do (`quantize_activation`:
Q8_0 per run of 32 in storage order) and multiplies by the dequantized weight,
so the only difference left is float32 summation order: conftest's
assert_close, ||y - y_ref|| <= 1e-5 ||y_ref||. Every kernel the CPU supports is checked
(the portable one everywhere), on odd shapes: outputs not a multiple of the
SIMD width, inputs not a multiple of 32 or of the group, per-row and
per-tensor grids, act-order, 2/3/4/8 bits.
"""
import re

import numba
import numpy as np
import pytest

from conftest import assert_close, inputs
from runtime.errors import UserError
from runtime.formats.base import quantize_activation
from runtime.kernels import uniform_int8_numba, uniform_prefill_numba
from runtime.kernels.quant_activations_numba import LEVELS8, LEVELS16, quantize_blocks
from test_uniform_kernels import BITS, make_tensor

AVAILABLE = uniform_int8_numba.available_kernels()
# (n_out, n_in, group_size, per_tensor): odd outputs, inputs not a multiple of 32 or of the group
GRIDS = [(67, 200, 32, False), (1000, 512, 128, False), (67, 200, -1, False), (33, 96, -1, True),
         (1, 40, 32, False)]


@pytest.mark.parametrize("kernel", AVAILABLE)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n_out, n_in, group_size, per_tensor", GRIDS)
@pytest.mark.parametrize("sym", [False, True])
def test_int8_kernel_matches_reference(kernel, bits, n_out, n_in, group_size, per_tensor, sym):
    packed = make_tensor(bits, n_out, n_in, bits, group_size, sym=sym, per_tensor=per_tensor)
    x = inputs(bits, 1, n_in, mean=0.5)  # [1, in]
    assert_close(uniform_int8_numba.matvec(packed, x[0], kernel), packed.matmul_reference_int8(x)[0])


@pytest.mark.parametrize("kernel", AVAILABLE)
@pytest.mark.parametrize("bits", BITS)
def test_int8_kernel_act_order(kernel, bits):
    packed = make_tensor(10 + bits, 45, 160, bits, 32, act_order=True)
    assert packed.act_order
    x = inputs(bits, 1, 160, mean=0.5)  # [1, in]
    assert_close(uniform_int8_numba.matvec(packed, x[0], kernel), packed.matmul_reference_int8(x)[0])


def test_activation_quantization_is_q8_0_bit_for_bit():
    # the kernel's quantizer and the NumPy reference agree exactly, zero blocks included
    x = inputs(3, 1, 96, mean=0.5)[0] * 7  # [96]
    x[32:64] = 0
    q = np.empty(96, dtype=np.int8)
    d = np.empty(3, dtype=np.float32)
    quantize_blocks(x, q, d)
    assert np.abs(q).max() == 127 and d[1] == 0
    assert np.array_equal(np.repeat(d, 32) * q.astype(np.float32), quantize_activation(x[None])[0])
    # and the reference is a close approximation: at most half a step of each block away
    assert (np.abs(quantize_activation(x[None])[0] - x) <= np.repeat(d, 32) / 2 + 1e-7).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("group_runs", [uniform_int8_numba.HALF_RUN_GROUPS, 1, 2])
def test_quantized_input_is_in_the_tiles_byte_order(bits, group_runs):
    # quantize_input's shuffled vectors equal a gather by tile_byte_order (every width's order; 5 bits: storage
    # order), split into the two bytes 256 high + low; xsum is each group's d * sum of its values
    x = inputs(bits, 1, 150, mean=0.5)[0] * 5  # [150]: five runs, the last one padded
    x[40] = -x[41] * 300  # a large value: the extreme high bytes
    perm = np.zeros(0, dtype=np.int32)
    n_groups = 10 if group_runs == uniform_int8_numba.HALF_RUN_GROUPS else -(-5 // group_runs)
    xq, high, low, d, wide, xsum = uniform_int8_numba.quantize_input(x, perm, bits, 5, group_runs, n_groups)
    padded = np.zeros(160, dtype=np.float32)
    padded[:150] = x
    q = np.empty(160, dtype=np.int16)
    scales = np.empty(5, dtype=np.float32)
    quantize_blocks(padded, q, scales, LEVELS16)
    assert np.array_equal(xq, q) and np.array_equal(d, scales)
    order = np.arange(32)  # [32] the storage order, at widths without SIMD tiles (the portable lanes read xq)
    if bits in uniform_int8_numba.SIMD_BITS["avx512vnni"]:
        order = uniform_int8_numba.tile_byte_order(np.arange(32, dtype=np.int8), bits).astype(np.int64)  # [32]
        assert sorted(order) == list(range(32)) and (bits == 8) == (list(order) == list(range(32)))
    expected = q.reshape(5, 32)[:, order].reshape(-1)  # [160]
    assert np.array_equal(wide, expected)
    assert np.array_equal(256 * high.astype(np.int32) + low, expected)
    assert np.abs(high).max() == 127 and high.min() >= -127
    sums = q.reshape(10, 16).sum(axis=1) * np.repeat(d, 2)  # [half runs]
    if group_runs != uniform_int8_numba.HALF_RUN_GROUPS:
        runs = sums.reshape(5, 2).sum(axis=1)  # [runs]
        sums = np.array([runs[g * group_runs:(g + 1) * group_runs].sum() for g in range(n_groups)])
    assert_close(xsum, sums.astype(np.float32), 1e-6)


def test_int8_path_is_close_to_float_activations():
    # what the integer activations cost in accuracy on one product (4-bit, group 128): two bytes each,
    # 1/256 of the rounding of one byte (Q8_0, llama.cpp's activations)
    packed = make_tensor(5, 256, 576, 4, 128)
    x = inputs(5, 1, 576, mean=0.5)  # [1, in]
    ref = packed.matmul_reference(x)[0]
    y = packed.matmul(x)[0]
    assert not np.array_equal(y, ref)  # the integer path does round the activations
    assert_close(y, ref, tol=1e-4)
    one_byte = packed.matmul_reference_int8(x, LEVELS8)[0]
    assert np.linalg.norm(y - ref) < np.linalg.norm(one_byte - ref) / 50


def test_activation_modes_pick_the_kernel(monkeypatch):
    packed = make_tensor(6, 67, 200, 4, 32)
    x = inputs(6, 3, 200, mean=0.5)  # [3, in]
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8")
    decode_reference = packed.matmul_reference_int8 if uniform_int8_numba.simd_tiles(4, AVAILABLE[0]) else packed.matmul_reference
    assert_close(packed.matmul(x[:1]), decode_reference(x[:1]))  # decode: int8 where SIMD tiles exist
    assert_close(packed.matmul(x), packed.matmul_reference(x))  # prefill: float tiles
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8-all")
    assert_close(packed.matmul(x), packed.matmul_reference_int8(x))
    monkeypatch.setenv("QLLM_ACTIVATIONS", "float")
    assert_close(packed.matmul(x[:1]), packed.matmul_reference(x[:1]))
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int4")
    with pytest.raises(UserError, match="QLLM_ACTIVATIONS"):
        packed.matmul(x)
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8")
    monkeypatch.setenv("QLLM_INT8_KERNEL", "neon")  # unknown (and one this CPU lacks would be refused)
    with pytest.raises(UserError, match="QLLM_INT8_KERNEL"):
        packed.matmul(x[:1])


def test_decode_keeps_float_activations_at_widths_without_simd_tiles(monkeypatch):
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8")
    monkeypatch.setenv("QLLM_INT8_KERNEL", "portable")  # no SIMD tiles: the float kernel is faster there
    packed = make_tensor(7, 67, 200, 3, 32)
    x = inputs(7, 1, 200, mean=0.5)  # [1, in]
    assert not uniform_int8_numba.simd_tiles(3, "portable")
    assert_close(packed.matmul(x), packed.matmul_reference(x))
    assert packed.matmul_parts([packed, packed], x) is None


@pytest.mark.parametrize("kernel, instructions", [("avx512vnni", {"vpdpbusd"}),
                                                  ("avx2", {"vpmaddubsw", "vpmaddwd"})])
@pytest.mark.parametrize("bits", [3, 4])
def test_simd_kernels_use_dot_product_instructions(kernel, instructions, bits):
    if kernel not in AVAILABLE:
        pytest.skip(f"the CPU lacks {kernel}")
    packed = make_tensor(7, 64, 128, bits, 128)
    x = inputs(7, 1, 128, mean=0.5)[0]  # [in]
    fresh = numba.njit(uniform_int8_numba._tiles.py_func)  # compiled here (not from the cache): asm at hand
    weight = uniform_int8_numba.kernel_weight(packed)
    quantized = uniform_int8_numba.quantize_input(x, weight.perm, bits, 4, 4, 1)
    y = np.empty(64, dtype=np.float32)  # [out]
    fresh(uniform_int8_numba.tile_variant(bits, kernel), weight.blocked, weight.scales, weight.zeros, quantized,
          bits, 4, uniform_int8_numba.NO_LUT, 0, 4, y)
    assert_close(y, packed.matmul_reference_int8(x[None])[0])
    asm = "".join(fresh.inspect_asm().values())
    assert instructions <= set(re.findall(r"\b(vpdpbusd|vpmaddubsw|vpmaddwd)\b", asm))


@pytest.mark.parametrize("kernel", AVAILABLE)
@pytest.mark.parametrize("bits", BITS)
def test_parts_in_one_call_equal_one_call_each(kernel, bits):
    # q/k/v-like: one input, outputs of different widths; act-order with the storage order shared
    parts = [make_tensor(20 + bits, n_out, 200, bits, 64) for n_out in (96, 40, 33)]
    x = inputs(bits, 1, 200, mean=0.5)[0]  # [in]
    assert uniform_int8_numba.fusable(parts)
    y = uniform_int8_numba.matvec_parts(parts, x, kernel)  # [169]
    assert_close(y, np.concatenate([uniform_int8_numba.matvec(p, x, kernel) for p in parts]))
    xs = inputs(bits + 9, 3, 200, mean=0.5)  # [3, in]: a different input per part (the incoherent format's)
    call = uniform_int8_numba.prepare(parts, kernel)
    for threads in (1, 2):
        numba.set_num_threads(threads)
        try:
            y = uniform_int8_numba.run(call._replace(parallel=threads > 1), xs)  # [169]
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        assert_close(y, np.concatenate([uniform_int8_numba.matvec(p, v, kernel) for p, v in zip(parts, xs)]))
    assert not uniform_int8_numba.fusable(parts + [make_tensor(1, 8, 200, bits, 32)])  # another grid
    shuffled = [make_tensor(1, 8, 200, bits, 64, act_order=True), parts[0]]
    assert not uniform_int8_numba.fusable(shuffled)


def test_linear_many_fuses_uniform_weights_and_adds_biases():
    from runtime.linear import linear, linear_many

    parts = [make_tensor(30 + i, n_out, 200, 4, 64) for i, n_out in enumerate((64, 32))]
    biases = [np.arange(64, dtype=np.float32), None]
    x = inputs(30, 1, 200, mean=0.5)  # [1, in]
    ys = linear_many(x, parts, biases)
    assert [y.shape for y in ys] == [(1, 64), (1, 32)]
    for y, w, b in zip(ys, parts, biases):
        assert_close(y, linear(x, w, b))
    x3 = inputs(31, 3, 200, mean=0.5)  # [3, in]: prefill rows go one weight at a time
    for y, w in zip(linear_many(x3, parts), parts):
        assert_close(y, linear(x3, w))


@pytest.mark.parametrize("kernel", AVAILABLE)
@pytest.mark.parametrize("bits", BITS)
def test_parallel_and_serial_paths_agree(kernel, bits, monkeypatch):
    # small products run on the calling thread; PARALLEL_BYTES = 0 sends them through the parallel region
    parts = [make_tensor(40 + bits, n_out, 200, bits, 64) for n_out in (96, 40)]
    x = inputs(bits, 1, 200, mean=0.5)[0]  # [in]
    serial = uniform_int8_numba.matvec_parts(parts, x, kernel)  # [136]
    monkeypatch.setattr(uniform_int8_numba, "PARALLEL_BYTES", 0)
    assert_close(uniform_int8_numba.matvec_parts(parts, x, kernel), serial)
    single = make_tensor(50 + bits, 67, 200, bits, -1)
    assert_close(uniform_int8_numba.matvec(single, x, kernel), single.matmul_reference_int8(x[None])[0])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n_out, n_in, group_size, per_tensor", GRIDS[:4])
def test_dequantized_tiles_equal_the_reference(bits, n_out, n_in, group_size, per_tensor):
    packed = make_tensor(70 + bits, n_out, n_in, bits, group_size, per_tensor=per_tensor, act_order=group_size > 0)
    weight = uniform_int8_numba.kernel_weight(packed)
    tiles = weight.blocked.shape[0]
    out = np.full((-(-n_in // 32) * 32, tiles * 16), np.nan, dtype=np.float32)  # [in_pad, tiles * 16]
    values = np.arange(1 << bits, dtype=np.float32)  # [2**bits]
    for t0 in range(0, tiles, 2):  # two tiles at a time into their columns
        uniform_int8_numba.dequantize_tiles(weight.blocked, weight.scales, weight.zeros, bits, weight.group_runs,
                                            values, t0, min(t0 + 2, tiles), out[:, 16 * t0:])
    stored = packed.dequantize() if packed.perm is None else packed.dequantize()[:, packed.perm]  # [out, in] stored
    assert_close(out[:n_in, :n_out], np.ascontiguousarray(stored.T))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n_out, n_in, group_size, per_tensor", GRIDS[:3])
def test_prefill_reads_the_blocked_codes(bits, n_out, n_in, group_size, per_tensor, monkeypatch):
    # once decode blocks the codes, many-row products dequantize from them (not from qweight), with float
    # activations: the reference's products, act-order and buffers of several tiles with a short last one
    from runtime.kernels import uniform_numba

    if not uniform_int8_numba.simd_tiles(bits, AVAILABLE[0]):
        pytest.skip(f"decode keeps float activations for {bits} bits on this CPU, so nothing is blocked")
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8")
    monkeypatch.setattr(uniform_int8_numba, "PREFILL_TILE", 2 * 16 * n_in)
    monkeypatch.setattr(uniform_numba, "matmul", None)  # the stored-codes path must not run
    for act_order in {False, group_size > 0}:
        packed = make_tensor(60 + bits, n_out, n_in, bits, group_size, per_tensor=per_tensor, act_order=act_order)
        x = inputs(bits, 7, n_in, mean=0.5)  # [7, in]
        y = packed.matmul(x)  # [7, out]
        assert packed._int8_weight is not None
        assert_close(y, packed.matmul_reference(x), tol=3e-5)  # float accuracy either way
        if uniform_prefill_numba.integer_prefill(packed.int8_weight(), AVAILABLE[0]):  # two-byte activations
            assert_close(y, packed.matmul_reference_int8(x, LEVELS16))
        else:  # dequantized tiles and BLAS
            assert_close(y, packed.matmul_reference(x))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n_out, n_in, group_size, per_tensor", GRIDS)
@pytest.mark.parametrize("rows", [1, 5, 37])
def test_integer_prefill_matches_its_reference(bits, n_out, n_in, group_size, per_tensor, rows, monkeypatch):
    # rows not a multiple of CHUNK or of ROW_BLOCK; several row blocks; act-order where a grid has groups
    if "avx512vnni" not in AVAILABLE:
        pytest.skip("the CPU lacks avx512vnni")
    monkeypatch.setattr(uniform_prefill_numba, "ROW_BLOCK", 8)
    packed = make_tensor(80 + bits, n_out, n_in, bits, group_size, per_tensor=per_tensor, act_order=group_size > 0)
    weight = uniform_int8_numba.kernel_weight(packed)
    x = inputs(rows, rows, n_in, mean=0.5)  # [rows, in]
    y = uniform_prefill_numba.matmul(weight, np.arange(1 << bits, dtype=np.float32), x, "avx512vnni")
    assert_close(y, packed.matmul_reference_int8(x, LEVELS16))
    assert_close(y, packed.matmul_reference(x), tol=3e-5)
    q = np.empty(64, dtype=np.int16)
    d = np.empty(2, dtype=np.float32)
    quantize_blocks(x[0, :64] * 1e3, q, d, LEVELS16)  # the two-byte levels: |q| <= 32639, hi and lo bytes
    assert np.abs(q).max() == LEVELS16
    hi = (q.astype(np.int32) + 128) >> 8
    assert np.abs(hi).max() <= 127 and ((q - 256 * hi) >= -128).all() and ((q - 256 * hi) <= 127).all()


def test_integer_prefill_uses_the_dot_product_instruction():
    if "avx512vnni" not in AVAILABLE:
        pytest.skip("the CPU lacks avx512vnni")
    packed = make_tensor(9, 64, 128, 4, 128)
    weight = uniform_int8_numba.kernel_weight(packed)
    x = inputs(9, 4, 128, mean=0.5)  # [4, in]
    quantized = uniform_prefill_numba.quantize_rows(x, weight.perm, 4, 4, 4, 1, 4)
    fresh = numba.njit(uniform_prefill_numba._prefill.py_func)  # compiled here (not from the cache): asm at hand
    variant = uniform_prefill_numba.chunk_variant(4, lut=False)
    y = fresh(weight.blocked, weight.scales, weight.zeros, *quantized, variant, uniform_prefill_numba.CHUNK, 4,
              weight.lut, 1)  # [4, 64]
    assert_close(y, quantize_activation(x, None, LEVELS16) @ packed.dequantize().T)
    assert "vpdpbusd" in "".join(fresh.inspect_asm().values())
