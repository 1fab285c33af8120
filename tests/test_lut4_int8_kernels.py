"""The int8-activation decode kernel of the lut4 format (NF4 / FP4) against its NumPy reference.

The lut4 codes are repacked into the uniform int8 kernel's layout and looked
up in a table of signed 12-bit values (`lut_table`). The reference
(`Lut4Tensor.matmul_reference_int8`) quantizes the activation as the kernel
does and multiplies by the weight with that rounded table, so what is left
is float32 summation order: conftest's assert_close, ||y - y_ref|| <= 1e-5 ||y_ref||. Every kernel
the CPU supports is checked (portable everywhere), on odd shapes: outputs
not a multiple of the SIMD width, per-block absmax and double-quantized.
"""
import re

import numba
import numpy as np
import pytest

import nf4
from conftest import assert_close, inputs
from runtime.formats.lut4 import lut_table, lut_values
from runtime.kernels import lut4_numba, uniform_int8_numba
from test_lut4_format import random_tensor

AVAILABLE = uniform_int8_numba.available_kernels()
SHAPES = [(67, 128, 64), (1000, 576, 64), (17, 96, 32), (33, 256, 128), (1, 64, 64)]  # (out, in, block)


@pytest.mark.parametrize("kernel", AVAILABLE)
@pytest.mark.parametrize("n_out, n_in, block_size", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_lut_kernel_matches_reference(kernel, n_out, n_in, block_size, double_quant):
    rng = np.random.default_rng(n_out + n_in)
    packed = random_tensor(rng, n_out, n_in, block_size, double_quant)
    x = inputs(rng, 1, n_in)  # [1, in]
    y = uniform_int8_numba.matvec(packed.int8_weight(), x[0], kernel)  # [out]
    # float32 sums of products of two-byte activations and 12-bit table values: their rounding is
    # relative to the sizes of the products summed (one output of 64 inputs can cancel to 1e-3 of those)
    scale = np.abs(x[0]) @ np.abs(packed.dequantize()).T  # [out]
    assert np.linalg.norm(y - packed.matmul_reference_int8(x)[0]) <= 1e-5 * np.linalg.norm(scale)


def test_table_rounding_is_within_half_a_step():
    table = nf4.nf4_table()
    lut, step = lut_table(table)
    assert lut.dtype == np.uint8 and lut.shape == (32,) and step == np.float32(1.0 / 2047)  # max |NF4| is 1
    values = lut_values(lut)  # [16] signed int16 of the high and low bytes
    assert values[0] == -2047 and values[7] == 0 and values[15] == 2047  # -1, 0 and 1
    assert np.array_equal(lut[:16].view(np.int8).astype(np.int64) * 256 + lut[16:], values)  # two's complement
    assert np.abs(values * np.float64(step) - table).max() <= step / 2


def test_blocks_that_are_not_whole_runs_keep_float_activations(monkeypatch):
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8")
    rng = np.random.default_rng(3)
    packed = random_tensor(rng, 20, 48, 16)  # blocks of 16 inputs: no int8 kernel
    assert packed.int8_weight() is None
    x = inputs(rng, 1, 48)  # [1, in]
    assert np.allclose(packed.matmul(x), packed.matmul_reference(x), rtol=1e-5, atol=1e-5)


def test_decode_goes_through_the_int8_kernel_by_default(monkeypatch):
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8")
    rng = np.random.default_rng(4)
    packed = random_tensor(rng, 48, 128)
    x = inputs(rng, 1, 128)  # [1, in]
    simd = uniform_int8_numba.simd_tiles(4, AVAILABLE[0], lut=True)
    reference = packed.matmul_reference_int8 if simd else packed.matmul_reference
    assert_close(packed.matmul(x), reference(x))
    monkeypatch.setenv("QLLM_ACTIVATIONS", "float")
    assert_close(packed.matmul(x), packed.matmul_reference(x))
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8-all")  # every row, any kernel
    x3 = inputs(rng, 3, 128)  # [3, in]
    assert_close(packed.matmul(x3), packed.matmul_reference_int8(x3))


@pytest.mark.parametrize("kernel", AVAILABLE)
def test_parts_in_one_call_equal_one_call_each(kernel, monkeypatch):
    monkeypatch.setenv("QLLM_INT8_KERNEL", kernel)
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((96, 192)) * 0.02).astype(np.float32)  # [out, in]
    parts = [nf4.quantize(w[:64]), nf4.quantize(w[64:80]), nf4.quantize(w[80:])]  # q/k/v: one table
    x = inputs(rng, 1, 192)  # [1, in]
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8")
    if not uniform_int8_numba.simd_tiles(4, kernel, lut=True):
        assert parts[0].matmul_parts(parts, x) is None  # float activations where there are no table tiles
        monkeypatch.setenv("QLLM_ACTIVATIONS", "int8-all")
    ys = parts[0].matmul_parts(parts, x)
    for y, p in zip(ys, parts):
        assert_close(y[0], uniform_int8_numba.matvec(p.int8_weight(), x[0], kernel))
    other = random_tensor(rng, 16, 192)  # another table: not fusable
    assert parts[0].matmul_parts(parts[:2] + [other], x) is None


def test_nf4_model_weight_int8_product_is_close_to_float():
    # what the int8 activations and the rounded table cost on one NF4-quantized product
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((256, 576)) * 0.02).astype(np.float32)  # [out, in]
    packed = nf4.quantize(w)
    x = inputs(rng, 1, 576)  # [1, in]
    ref = packed.matmul_reference(x)[0]
    y = packed.matmul_reference_int8(x)[0]
    assert not np.array_equal(y, ref)  # the int8 path does round the activations and the table
    assert_close(y, ref, tol=1e-2)


def test_repack_puts_the_codes_where_the_uniform_kernel_reads_them():
    # input i of output o: tile o // 16, run i // 32, word (i % 32) // 8 of the run, nibble i % 8, lane o % 16
    rng = np.random.default_rng(7)
    packed = random_tensor(rng, 5, 64, 32)
    blocked = packed.int8_weight().blocked.view(np.uint32)  # [1, runs * 4 * 16]
    codes = np.stack([packed.qweight >> 4, packed.qweight & 15], axis=-1).reshape(5, 64)  # [out, in]
    for i in range(64):
        words = blocked[0, (i // 8) * 16:(i // 8) * 16 + 5]  # [5] the word of input i of each output
        assert np.array_equal((words >> np.uint32(4 * (i % 8))) & 15, codes[:, i])
    assert not blocked[0, 5:16].any()  # outputs past the last one are zero codes


def test_vnni_lut_tile_uses_the_byte_shuffle():
    if "avx512vnni" not in AVAILABLE:
        pytest.skip("the CPU lacks avx512vnni")
    rng = np.random.default_rng(8)
    packed = random_tensor(rng, 32, 64)
    weight = packed.int8_weight()
    x = inputs(rng, 64)  # [in]
    fresh = numba.njit(uniform_int8_numba._tiles.py_func)  # compiled here (not from the cache): asm at hand
    quantized = uniform_int8_numba.quantize_input(x, weight.perm, 4, 2, 2, 1)
    y = np.empty(32, dtype=np.float32)  # [out]
    fresh(uniform_int8_numba.tile_variant(4, "avx512vnni", lut=True), weight.blocked, weight.scales, weight.zeros,
          quantized, 4, 2, weight.lut, 0, 2, y)
    assert_close(y, packed.matmul_reference_int8(x[None])[0])
    asm = "".join(fresh.inspect_asm().values())
    assert {"vpshufb", "vpdpwssd"} <= set(re.findall(r"\b(vpshufb|vpdpwssd)\b", asm))


@pytest.mark.parametrize("n_out, n_in, block_size, double_quant", [(67, 128, 64, False), (1000, 576, 64, True),
                                                                   (33, 256, 128, False), (5, 64, 32, True)])
def test_prefill_after_the_repack_reads_the_repacked_codes(n_out, n_in, block_size, double_quant, monkeypatch):
    # once the int8 view exists, many-row products read it: in integers (two-byte activations, 12-bit table
    # values) on AVX-512 VNNI, else dequantized tiles and BLAS with the reference's products
    if not uniform_int8_numba.simd_tiles(4, AVAILABLE[0], lut=True):
        pytest.skip("decode keeps float activations on this CPU, so nothing is repacked")
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8")
    monkeypatch.setattr(uniform_int8_numba, "PREFILL_TILE", 3 * 16 * n_in)  # several buffers, the last one short
    rng = np.random.default_rng(n_out)
    packed = random_tensor(rng, n_out, n_in, block_size, double_quant)
    x = inputs(rng, 9, n_in)  # [9, in]
    monkeypatch.setattr(lut4_numba, "matmul_prefill", None)  # the stored-codes path must not run
    y = packed.matmul(x)  # [9, out]
    weight = packed.int8_weight()
    np.testing.assert_array_equal(y, lut4_numba.matmul_prefill_repacked(packed, weight, x, AVAILABLE[0]))
    scale = np.abs(x) @ np.abs(packed.dequantize()).T  # [9, out] the size of the products summed
    assert np.linalg.norm(y - packed.matmul_reference_int8(x)) <= 1e-5 * np.linalg.norm(scale)
    assert_close(y, x @ packed.dequantize().T, tol=1e-3)  # the table's rounding: at most max|value| / 4094
    tiles = lut4_numba.matmul_prefill_repacked(packed, weight, x, "portable")  # [9, out] dequantized tiles + BLAS
    assert_close(tiles, x @ packed.dequantize().T)


def test_float_activations_never_repack(monkeypatch):
    # with float activations (or a CPU without table tiles) neither decode nor prefill builds the int8 view
    monkeypatch.setenv("QLLM_ACTIVATIONS", "float")
    rng = np.random.default_rng(11)
    packed = random_tensor(rng, 48, 128)

    def refuse(_):
        raise AssertionError("repacked")

    monkeypatch.setattr(lut4_numba, "decode_weight", refuse)
    for rows in (1, 9):
        x = inputs(rng, rows, 128)  # [rows, in]
        assert_close(packed.matmul(x), packed.matmul_reference(x))
