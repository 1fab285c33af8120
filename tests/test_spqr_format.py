"""The spqr format: NumPy reference, Numba (and, with a GPU, CUDA) kernels against it,
bilevel statistics, exact outliers, and the stored bytes (its sparse outliers alone: test_sparse_format.py).

Kernel tolerance: conftest's assert_close, ||y - y_ref|| <= 1e-5 ||y_ref|| (float32
sums in another order; the kernels fold scale and zero once per group and add
the outliers as corrections value - dense value). Inputs have a mean of 0.5,
as after an activation, so the folded zero term matters.
"""
import json

import numpy as np
import pytest

from conftest import assert_close, assert_device_matches_reference, inputs
from runtime.errors import UserError
from runtime.formats.spqr import SpQRTensor, check_params, dequantize_stats, quantize_stats
from runtime.formats.uniform import unpack
from runtime.kernels import spqr_numba, uniform_int8_numba, uniform_prefill_numba
from runtime.kernels.quant_activations_numba import LEVELS16
from runtime.checkpoints.packed_checkpoint import WEIGHTS, save_packed
from runtime.checkpoints.safetensors_io import read_safetensors
from test_sparse_format import random_outliers

# (n_out, n_in, group_size, stat_group): inputs not a multiple of 32 or of the group, odd outputs
SHAPES = [(67, 200, 16, 16), (67, 200, 48, 16), (40, 96, 32, 7), (33, 64, 64, 33)]


def make_tensor(seed, n_out, n_in, bits, group_size, stat_bits=3, stat_group=16, fraction=0.02, act_order=True,
                perm=None):
    rng = np.random.default_rng(seed)
    n_groups = -(-n_in // group_size)
    codes = rng.integers(0, 2**bits, size=(n_out, n_in))  # [out, in]
    if perm is None:
        perm = rng.permutation(n_in) if act_order else np.arange(n_in)  # [in]
    scales = rng.uniform(0.01, 0.1, size=(n_groups, n_out)).astype(np.float32)  # [n_groups, out]
    zeros = rng.uniform(0, 2**bits - 1, size=(n_groups, n_out)).astype(np.float32)  # [n_groups, out]
    if stat_bits != 16:
        scales = quantize_stats(scales, stat_bits, stat_group)
        zeros = quantize_stats(zeros, stat_bits, stat_group)
    return SpQRTensor.from_codes(codes, perm, scales, zeros, random_outliers(rng, n_out, n_in, fraction), bits=bits,
                                 group_size=group_size, stat_bits=stat_bits, stat_group=stat_group)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n_out, n_in, group_size, stat_group", SHAPES)
@pytest.mark.parametrize("stat_bits", [3, 16])
def test_numba_matches_reference(bits, n_out, n_in, group_size, stat_group, stat_bits, monkeypatch):
    monkeypatch.setenv("QLLM_ACTIVATIONS", "float")  # the float kernels (int8 decode: the test below)
    packed = make_tensor(bits, n_out, n_in, bits, group_size, stat_bits, stat_group)
    assert packed.outliers.nnz > 0
    for rows in (1, 5):  # fused decode kernel, prefill path
        x = inputs(rows, rows, n_in, mean=0.5)
        assert_close(packed.matmul(x), packed.matmul_reference(x))


@pytest.mark.parametrize("kernel", uniform_int8_numba.available_kernels())
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n_out, n_in, group_size", [(67, 200, 32), (40, 96, 64), (1000, 512, 32), (67, 200, 16),
                                                     (40, 208, 16), (1000, 512, 16)])  # 16: half-run groups
def test_int8_decode_matches_its_reference(kernel, bits, n_out, n_in, group_size, monkeypatch):
    # the dense part through the uniform int8 kernel (float32 statistics), the outliers in float
    monkeypatch.setenv("QLLM_INT8_KERNEL", kernel)
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8-all")  # every kernel and width, tiles or not
    packed = make_tensor(30 + bits, n_out, n_in, bits, group_size)
    assert packed.outliers.nnz > 0 and packed.int8_weight() is not None
    x = inputs(31, 2, n_in, mean=0.5)  # [2, in]
    assert_close(packed.matmul(x), packed.matmul_reference_int8(x))
    parts = [packed, make_tensor(40 + bits, 20, n_in, bits, group_size, perm=packed.perm),  # one storage order
             make_tensor(50 + bits, 36, n_in, bits, group_size, fraction=0, perm=packed.perm)]  # no outliers
    assert parts[2].outliers.nnz == 0
    ys = packed.matmul_parts(parts, x[:1])  # q/k/v-style: one call, each part's outliers added
    for y, part in zip(ys, parts):
        assert_close(y, part.matmul_reference_int8(x[:1]))
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8")
    if uniform_int8_numba.simd_tiles(bits, kernel):  # prefill then reads the blocked codes, not qweight
        with monkeypatch.context() as patch:
            patch.setattr(spqr_numba, "matmul_dense", None)
            x5 = inputs(32, 5, n_in, mean=0.5)  # [5, in]: prefill keeps float accuracy
            y5 = packed.matmul(x5)  # [5, out]
            assert_close(y5, packed.matmul_reference(x5), tol=3e-5)
            integer = uniform_prefill_numba.integer_prefill(packed.int8_weight(), kernel)  # two-byte activations
            assert_close(y5, packed.matmul_reference_int8(x5, LEVELS16) if integer else packed.matmul_reference(x5))
    expected = packed.matmul_reference_int8 if uniform_int8_numba.simd_tiles(bits, kernel) else packed.matmul_reference
    assert_close(packed.matmul(x[:1]), expected(x[:1]))  # decode: int8 where the kernel has tiles
    assert make_tensor(5, 20, 96, bits, 48).int8_weight() is None  # groups of 48: float activations
    if not uniform_int8_numba.simd_tiles(bits, kernel):  # int8 mode keeps float activations: no float32 stats
        monkeypatch.setattr(SpQRTensor, "int8_weight", lambda self: pytest.fail("statistics decoded"))
        other = make_tensor(6, 20, n_in, bits, group_size)
        assert_close(other.matmul(x[:1]), other.matmul_reference(x[:1]))



@pytest.mark.parametrize("kernel", uniform_int8_numba.available_kernels())
@pytest.mark.parametrize("stat_bits, stat_group, layout", [(3, 16, np.uint32), (4, 32, np.uint32),
                                                           (3, 7, np.float32), (16, 16, np.uint16)])
@pytest.mark.parametrize("group_size", [16, 32])
def test_int8_kernels_read_every_statistics_layout(kernel, stat_bits, stat_group, layout, group_size, monkeypatch):
    # quantized statistics in blocks of whole tiles stay codes (uint32 words), float16 ones float16 bits, the
    # rest float32: decode, prefill (integer or dequantized tiles) and the portable lanes equal the reference
    monkeypatch.setenv("QLLM_INT8_KERNEL", kernel)
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8-all")
    packed = make_tensor(80 + stat_bits, 90, 208, 3, group_size, stat_bits, stat_group)
    weight = packed.int8_weight()
    assert weight.scales.dtype == layout and weight.zeros.dtype == layout
    if layout == np.uint32:  # 16 code bytes + one low/step word per tile and group
        assert weight.scales.shape[2] == uniform_int8_numba.CODE_WORDS + 1
    x = inputs(81, 37, 208, mean=0.5)  # [37, in]: prefill past one block of rows
    assert_close(packed.matmul(x[:1]), packed.matmul_reference_int8(x[:1]))
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8")
    y5 = packed.matmul(x)  # [37, out]
    integer = uniform_prefill_numba.integer_prefill(weight, kernel)
    assert_close(y5, packed.matmul_reference_int8(x, LEVELS16) if integer else packed.matmul_reference(x))


def test_coded_statistics_need_whole_tiles():
    codes = np.zeros((2, 40), np.uint8)
    halves = np.zeros((2, 2), np.float16)
    with pytest.raises(ValueError, match="whole tiles"):
        uniform_int8_numba.coded_statistics(codes, halves, halves, 24)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dequantize_kernel_equals_dense_reference(bits):
    packed = make_tensor(10 + bits, 67, 200, bits, 16)
    w_t = spqr_numba.dequantize_storage(packed)  # [224, 67] storage order, padded
    assert np.all(w_t[208:] == 0)  # half runs past the input
    dense = packed.dequantize_dense()  # [67, 200]
    np.testing.assert_allclose(w_t[:200].T, dense[:, packed.perm], rtol=1e-6, atol=1e-6)


def test_fused_matvec_equals_dense_reference_and_tiles(monkeypatch):
    monkeypatch.setenv("QLLM_ACTIVATIONS", "float")
    monkeypatch.setattr(spqr_numba, "PREFILL_TILE", 64 * 512)  # several prefill tiles
    packed = make_tensor(20, 1000, 512, 3, 16, stat_group=16)
    x = inputs(21, 1, 512, mean=0.5)
    assert_close(spqr_numba.matvec_dense(packed, x[0])[None], x @ packed.dequantize_dense().T)
    x = inputs(22, 4, 512, mean=0.5)
    assert_close(packed.matmul(x), packed.matmul_reference(x))


def test_outliers_replace_the_dense_weight_exactly():
    packed = make_tensor(30, 67, 200, 3, 16, fraction=0.05)
    outliers = packed.outliers
    rows, cols = outliers.rows(), outliers.col_idx.astype(np.int64)
    w, dense = packed.dequantize(), packed.dequantize_dense()
    np.testing.assert_array_equal(w[rows, cols], outliers.values.astype(np.float32))  # bit-exact float16 values
    elsewhere = np.ones(w.shape, dtype=bool)
    elsewhere[rows, cols] = False
    np.testing.assert_array_equal(w[elsewhere], dense[elsewhere])
    np.testing.assert_allclose(packed.corrections, w[rows, cols] - dense[rows, cols], rtol=0, atol=1e-6)


@pytest.mark.parametrize("stat_bits", [2, 3, 4, 8])
def test_bilevel_statistics_round_trip(stat_bits):
    rng = np.random.default_rng(stat_bits)
    values = rng.uniform(0.01, 0.2, size=(5, 70)).astype(np.float32)  # [groups, rows], 70 = 4 blocks of 16 + 6
    codes, step, low = quantize_stats(values, stat_bits, 16)
    assert codes.shape == (5, 70) and step.shape == low.shape == (5, 5) and step.dtype == low.dtype == np.float16
    assert codes.max() < 2**stat_bits
    decoded = dequantize_stats(codes, step, low, 16)  # [5, 70]
    block = np.arange(70) // 16
    assert np.all(np.abs(decoded - values) <= step.astype(np.float32)[:, block] / 2 * (1 + 1e-3))
    assert np.all(decoded > 0)  # a positive statistic stays positive (low rounded up)
    # values already on a block's grid come back exactly; a constant block is exact
    again = quantize_stats(decoded, stat_bits, 16)
    np.testing.assert_array_equal(dequantize_stats(*again, 16), decoded)
    flat = np.full((1, 16), 0.03125, np.float32)
    np.testing.assert_array_equal(dequantize_stats(*quantize_stats(flat, stat_bits, 16), 16), flat)


def test_statistics_decode_through_the_packed_layout():
    packed = make_tensor(50, 67, 96, 3, 32, stat_bits=3, stat_group=16)
    s, z = packed.statistics()  # [3, 67]
    codes = unpack(np.ascontiguousarray(packed.stats["scale_codes"].T), 3, 67).T  # [3, 67]
    expected = dequantize_stats(codes, packed.stats["scale_step"], packed.stats["scale_low"], 16)  # [3, 67]
    np.testing.assert_array_equal(s, expected)
    assert np.all(s > 0) and z.shape == (3, 67)


@pytest.mark.parametrize("stat_bits", [3, 16])
def test_bits_equal_the_bytes_on_disk(tmp_path, stat_bits):
    layers = {"q_proj": make_tensor(60, 96, 64, 3, 16, stat_bits),
              "down_proj": make_tensor(61, 64, 96, 4, 32, stat_bits)}
    norm = np.ones(64, dtype=np.float32)
    save_packed(tmp_path, {"quantization": {"method": "spqr"}}, {**layers, "norm": norm})
    path = tmp_path / WEIGHTS
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert len(raw) - 8 - header_len == sum(p.nbytes for p in layers.values()) + norm.nbytes
    arrays, metadata = read_safetensors(path)
    for name, packed in layers.items():
        meta = json.loads(metadata[name])
        assert meta.pop("format") == "spqr"
        parts = {key[len(name) + 1:]: np.asarray(a) for key, a in arrays.items() if key.startswith(name + ".")}
        loaded = SpQRTensor.from_tensors(parts, meta)
        np.testing.assert_array_equal(loaded.dequantize(), packed.dequantize())
        n_weights = packed.shape[0] * packed.shape[1]
        assert loaded.bits_per_weight == packed.bits_per_weight == 8 * packed.nbytes / n_weights


def test_bits_per_weight_formula():
    # b + 2 sb / G + 64 / (G SG) + 32 / out + 32 (out + 1 + nnz) / (in out) when 32 | in, 32 | out, G | in, SG | out
    packed = make_tensor(70, 128, 256, 3, 16, stat_bits=3, stat_group=16)
    n_out, n_in = packed.shape
    expected = 3 + 6 / 16 + 64 / 256 + 32 / n_out + 32 * (n_out + 1 + packed.outliers.nnz) / (n_in * n_out)
    assert packed.bits_per_weight == pytest.approx(expected, rel=1e-12)


def test_bad_parameters_and_arrays_raise_user_error():
    for args in ((8, 16, 3, 16), (3, 24, 3, 16), (3, 16, 1, 16), (3, 16, 3, 0)):
        with pytest.raises(UserError, match="spqr"):
            check_params(*args)
    packed = make_tensor(80, 40, 64, 3, 16)
    parts, meta = packed.tensors(), {"format": "spqr", **packed.meta()}
    meta.pop("format")
    with pytest.raises(UserError, match="metadata"):
        SpQRTensor.from_tensors(parts, {**meta, "bits": 4})
    with pytest.raises(UserError, match="scale_codes|lack"):
        SpQRTensor.from_tensors({k: v for k, v in parts.items() if k != "scale_codes"}, meta)
    with pytest.raises(UserError, match="features"):
        packed.matmul(np.zeros((1, 65), np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("stat_bits", [3, 16])
def test_cuda_matches_reference(cupy, bits, stat_bits):
    assert_device_matches_reference(cupy, make_tensor(90 + bits, 1000, 200, bits, 16, stat_bits))


@pytest.mark.gpu
def test_cuda_sparse_and_dequantize_match_reference(cupy):
    from runtime.kernels import spqr_cuda

    packed = make_tensor(95, 67, 200, 3, 32)
    w_t = cupy.asnumpy(spqr_cuda.dequantize_storage(packed.to_device(cupy)))  # [224, 67]
    np.testing.assert_allclose(w_t[:200].T, packed.dequantize_dense()[:, packed.perm], rtol=1e-6, atol=1e-6)
    sparse = packed.outliers
    x = inputs(96, 3, 200, mean=0.5)
    y = cupy.asnumpy(sparse.to_device(cupy).matmul(cupy.asarray(x)))
    assert_close(y, sparse.matmul_reference(x), tol=1e-6)
