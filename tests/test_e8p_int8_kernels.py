"""The int8-activation decode kernel of the e8p format (QuIP# 2, 3 and 4 bits) against its NumPy reference.

E8P points times 4 are odd integers in [-11, 11], and the 1-bit E8 points of
3 bits' residual stage integers in [-8, 8], so the byte tables are exact
(checked against the codebooks); the reference (`E8PTensor.
matmul_reference_int8`) rotates x, quantizes it as the kernel does (Q8_0 per
block of 32) and multiplies by the decoded Ŵ, so what is left is float32
summation order: conftest's assert_close, ||y - y_ref|| <= 1e-5 ||y_ref||.
The kernels' tests take that reference with the kernels' own rotation
(`int8_reference`): NumPy's fast_hadamard and the Numba butterflies differ by
an ulp (checked in test_e8p_format), and an ulp can carry a rotated value
across a rounding tie of Q8_0 (seen on an AMD Zen 5: x/d = -100.5 in NumPy,
-100.500015 in Numba, one activation a level apart: 5e-4 of ||y||).
"""
import re

import numba
import numpy as np
import pytest

from bench_models import random_packed
from conftest import assert_close, inputs
from runtime import e8p_codebook
from runtime.formats.base import quantize_activation
from runtime.formats.e8p import E8PTensor
from runtime.hadamard import fast_hadamard
from runtime.kernels import e8p_numba, uniform_int8_numba

VNNI = "avx512vnni" in uniform_int8_numba.available_kernels()
needs_vnni = pytest.mark.skipif(not VNNI, reason="the CPU lacks avx512vnni")


def int8_reference(packed, x):
    """`matmul_reference_int8` of x [m, in] with x rotated by the kernels' own `hadamard_rows` (module docstring):
    Q8_0 activations times the decoded Ŵᵀ, rotated back in NumPy; [m, out]."""
    ones = np.ones(packed.in_features, dtype=np.float32)  # [in]
    x_rot = e8p_numba.hadamard_rows(x, packed.in_features, packed.signs_in, ones, False)  # [m, in]
    y_rot = quantize_activation(x_rot) @ packed.decoded().T  # [m, out]
    return fast_hadamard(y_rot, transpose=True) * packed.signs_out  # [m, out]


@pytest.mark.parametrize("codebook", e8p_codebook.VARIANTS)
def test_byte_table_is_the_codebook_times_four_plus_sixteen(codebook):
    table = e8p_numba.byte_table(codebook).view(np.uint8).reshape(-1, 8).astype(np.float32)  # [2^15, 8]
    codes = np.arange(1 << 16, dtype=np.uint16)
    points = e8p_codebook.decode(codes, codebook).reshape(-1, 8)  # [2^16, 8]
    decoded = (table[codes >> 1] + 2 * (codes & 1)[:, None] - e8p_numba.BYTE_ZERO) / 4  # [2^16, 8]
    assert np.array_equal(decoded, points)
    assert table.min() >= 0 and table.max() + 2 <= 255  # unsigned bytes for vpdpbusd


@pytest.mark.parametrize("codebook", e8p_codebook.VARIANTS)
def test_one_bit_byte_table_is_the_grid_times_four_plus_sixteen(codebook):
    table = e8p_numba.one_bit_byte_table(codebook).view(np.uint8).reshape(-1, 8).astype(np.float32)  # [256, 8]
    codes = np.arange(256, dtype=np.uint8)
    assert np.array_equal((table - e8p_numba.BYTE_ZERO) / 4, e8p_codebook.e8_1bit_decode(codes, codebook))
    assert table.min() >= 0 and table.max() <= 255  # unsigned bytes for vpdpbusd


@needs_vnni
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(24, 128), (576, 576), (8, 1536), (256, 384),  # 384 = 3 * 128: dense factor
                                   (20, 576), (36, 640)])  # rows past the last eight, two groups past 512
def test_int8_kernel_matches_reference(bits, shape):
    packed = random_packed(f"quipsharp{bits}", shape, seed=shape[0])
    assert e8p_numba.int8_applies(packed)
    x = inputs(shape[1], 2, shape[1])  # [2, in]
    assert_close(e8p_numba.matmul_int8(packed, x), int8_reference(packed, x))


@needs_vnni
def test_decode_picks_the_int8_kernel_by_mode(monkeypatch):
    packed = random_packed("quipsharp2", (64, 256), seed=1)
    x = inputs(2, 1, 256)  # [1, in]
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8")
    assert_close(packed.matmul(x), int8_reference(packed, x))
    monkeypatch.setenv("QLLM_ACTIVATIONS", "float")
    assert_close(packed.matmul(x), packed.matmul_reference(x))
    x3 = inputs(3, 3, 256)  # [3, in]
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8")
    assert_close(packed.matmul(x3), packed.matmul_reference(x3))  # more rows: float activations
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8-all")
    assert_close(packed.matmul(x3), int8_reference(packed, x3))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_odd_widths_keep_float_activations(bits, monkeypatch):
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8")
    narrow = random_packed(f"quipsharp{bits}", (32, 40), seed=5)  # 40 inputs: not whole chunks of 64
    assert not e8p_numba.int8_applies(narrow)
    x = inputs(6, 1, narrow.in_features)  # [1, in]
    assert_close(narrow.matmul(x), narrow.matmul_reference(x))


def test_int8_activations_cost_little_accuracy():
    packed = random_packed("quipsharp2", (256, 576), seed=7)
    x = inputs(8, 1, 576)  # [1, in]
    ref = packed.matmul_reference(x)
    y = packed.matmul_reference_int8(x)
    assert not np.array_equal(y, ref)  # the int8 path does round the activations
    assert_close(y, ref, tol=1e-2)


def fresh_decode(packed, x, vbmi: bool):
    """(y [out], the set of vp* instructions) of one decode product through `_decode_int8` compiled here (not
    from the cache: its assembly at hand), the VBMI chunks of the E8P stages on or off."""
    fresh = numba.njit(e8p_numba._decode_int8.py_func)
    call = list(e8p_numba.int8_call(packed))
    call[-1] = vbmi
    y = np.empty(packed.out_features, dtype=np.float32)  # [out]
    fresh(x, *call, y)
    return y, set(re.findall(r"\bvp\w+", "".join(fresh.inspect_asm().values())))


@needs_vnni
def test_kernel_uses_the_byte_dot_product():
    packed = random_packed("quipsharp2", (16, 128), seed=9)
    x = inputs(10, 1, 128)  # [1, in]
    y, instructions = fresh_decode(packed, x[0], vbmi=False)
    assert_close(y, int8_reference(packed, x)[0])
    assert "vpdpbusd" in instructions


@pytest.mark.skipif("avx512vbmi" not in e8p_numba._x86_features(), reason="the CPU lacks avx512vbmi")
@pytest.mark.parametrize("vbmi", [False, True])
@pytest.mark.parametrize("bits", [2, 3])
def test_byte_permute_path_equals_the_byte_table_path(vbmi, bits):
    # 1088 inputs: two whole chunks of 512 through the byte permutes, one of 64 through the byte table
    # (3 bits: the 1-bit E8 stage through its own tables)
    packed = random_packed(f"quipsharp{bits}", (40, 1088), seed=11)
    x = inputs(11, 1, 1088)  # [1, in]
    y, instructions = fresh_decode(packed, x[0], vbmi)
    assert_close(y, int8_reference(packed, x)[0])
    if vbmi:
        assert {"vpermi2b", "vpermt2b"} & instructions


@pytest.mark.parametrize("codebook", e8p_codebook.VARIANTS)
def test_coordinate_tables_are_the_source_table_times_four(codebook):
    tables = e8p_numba.coordinate_tables(codebook)  # [8, 256]
    assert tables.flags.c_contiguous and tables.dtype == np.int8  # the kernel reads it as 32 rows of 64 bytes
    assert np.array_equal(tables.T / 4, e8p_codebook.signed_source_table(codebook))
    packed = e8p_numba.packed_coordinate_tables(codebook)  # [4, 256]: what the VBMI kernels read (13 vectors)
    assert packed.flags.c_contiguous and packed.dtype == np.int8 and packed.shape == (4, 256)
    assert np.array_equal(packed[0], tables[0])  # coordinate 0 signed
    codes = packed[1:3].view(np.uint8).astype(np.int64)  # [2, 256] two bits per coordinate
    values = packed[3].view(np.uint8)  # [256] vpermb's table: six index bits, the low two count
    for c in range(1, 8):
        field = codes[0] >> (2 * (c - 1)) if c <= 4 else codes[1] >> (2 * (c - 5))  # [256]
        assert np.array_equal(values[field & 63], np.abs(tables[c]))  # what moves in above bit 1 is ignored
        assert np.array_equal(values[(field & 3) | 60], np.abs(tables[c]))
    one_bit = e8p_numba.one_bit_coordinate_tables(codebook)  # [8, 256]
    assert one_bit.flags.c_contiguous and one_bit.dtype == np.int8 and one_bit.min() >= 0
    points = e8p_codebook.e8_1bit_decode(np.arange(256, dtype=np.uint8), codebook)  # [256, 8]
    assert np.array_equal((one_bit.T.astype(np.float32) - e8p_numba.BYTE_ZERO) / 4, points)
    packed_one_bit = e8p_numba.packed_one_bit_tables(codebook)  # [5, 256]: 17 vectors
    assert packed_one_bit.flags.c_contiguous and packed_one_bit.dtype == np.int8 and packed_one_bit.shape == (5, 256)
    indices = packed_one_bit[:4].view(np.uint8).astype(np.int64)  # [4, 256] two 3-bit indices per byte
    one_bit_values = packed_one_bit[4].view(np.uint8)  # [256] vpermb's table: six index bits, the low three count
    for c in range(8):
        field = indices[c // 2] >> (3 * (c % 2))  # [256]
        assert np.array_equal(one_bit_values[field & 63], one_bit[c])


@needs_vnni
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quip_sharp_variant_through_the_integer_kernels(bits):
    """Imported QuIP# tensors (the "quip-sharp" codebook) take the same decode and prefill kernels with their own
    tables: each equals the variant's reference, and not the default variant's."""
    ours = random_packed(f"quipsharp{bits}", (40, 1088), seed=bits)
    packed = E8PTensor(**ours.tensors(), bits=bits, in_features=1088, codebook="quip-sharp")
    x = inputs(bits, 9, 1088)  # [9, in]
    expected = int8_reference(packed, x)  # [9, out]
    assert_close(e8p_numba.matmul_int8(packed, x[:1]), expected[:1])
    assert not np.allclose(expected, ours.matmul_reference_int8(x), rtol=1e-3)
    if e8p_numba.prefill_applies(packed):
        assert_close(e8p_numba.matmul_prefill_vbmi(packed, x), expected)


@pytest.mark.skipif("avx512vbmi" not in e8p_numba._x86_features(), reason="the CPU lacks avx512vbmi")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(24, 512), (40, 1536), (12, 1024), (20, 576), (36, 1088)])
def test_integer_prefill_matches_its_reference(bits, shape, monkeypatch):
    # many rows of Q8_0 activations through the byte permutes (inputs past the last whole chunk of 512, as
    # SmolLM2's 576, in float): the reference with the same activations, and within their rounding of the float
    # product; the format takes this path for prefill under the default mode
    packed = random_packed(f"quipsharp{bits}", shape, seed=shape[0] + bits)
    assert e8p_numba.prefill_applies(packed)
    x = inputs(shape[1] + 1, 9, shape[1])  # [9, in]
    y = e8p_numba.matmul_prefill_vbmi(packed, x)  # [9, out]
    assert_close(y, int8_reference(packed, x))
    assert_close(y, packed.matmul_reference(x), tol=1e-2)
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8")
    monkeypatch.setattr(e8p_numba, "matmul_prefill", None)  # the dequantized-tiles path must not run
    np.testing.assert_array_equal(packed.matmul(x), y)
    assert not e8p_numba.prefill_applies(random_packed("quipsharp2", (8, 448), seed=3))  # 448: no whole chunk



@pytest.mark.skipif("avx512vbmi" not in e8p_numba._x86_features(), reason="the CPU lacks avx512vbmi")
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_integer_prefill_over_tiles_of_rows_and_spans_of_outputs(bits):
    # 37 rows: two whole tiles of TILE_ROWS and a part; 80 outputs (20 * 4, a Hadamard size): two whole spans
    # of TASK_PASSES passes and a part ending inside a pass; 1536 inputs: three chunks
    span = e8p_numba.PREFILL_OUTPUTS * e8p_numba.TASK_PASSES
    rows, outputs = 2 * e8p_numba.TILE_ROWS + 5, 80
    assert 2 * span < outputs < 3 * span and outputs % e8p_numba.PREFILL_OUTPUTS
    packed = random_packed(f"quipsharp{bits}", (outputs, 1536), seed=bits)
    x = inputs(bits, rows, 1536)  # [rows, in]
    assert_close(e8p_numba.matmul_prefill_vbmi(packed, x), int8_reference(packed, x))

@needs_vnni
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shapes", [[(40, 1088), (24, 1088), (24, 1088)], [(72, 1088), (56, 1088)]])
def test_parts_in_one_call_equal_each_part_alone(bits, shapes, monkeypatch):
    # q/k/v-style: up to three parts of one input through one call (rotations and quantizations in parallel,
    # the output blocks of all parts, the output rotations), each part bit-identical to its own call and
    # within the reference's tolerance
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8")
    parts = [random_packed(f"quipsharp{bits}", shape, seed=20 + i) for i, shape in enumerate(shapes)]
    product = parts[0].one_row_product(parts)
    x = inputs(21, 1, 1088)[0]  # [in]
    ys = product(x)
    assert len(ys) == len(parts)
    for y, part in zip(ys, parts):
        alone = e8p_numba.run_int8(e8p_numba.int8_call(part), x, np.empty(part.out_features, np.float32))
        assert np.array_equal(y, alone)
        assert_close(y, int8_reference(part, x[None])[0])
