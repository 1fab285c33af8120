"""The int8 format (runtime/formats/int8.py) and its Numba / CUDA kernels.

The NumPy reference is checked against a hand-worked example; the integer
kernels must equal it exactly (the int32 sums are exact and the float steps
are done in the same order; one row with outlier columns sums their float
product in its own order, within float32 rounding); the decomposition with every column an outlier
must equal the float product; the stored bytes must match the documented
bits per weight.
"""
import json
import re
import struct

import numba
import numpy as np
import pytest

from conftest import inputs
from runtime.errors import UserError
from runtime.formats import FORMAT_CLASSES
from runtime.formats import int8 as fmt
from runtime.formats.int8 import Int8Tensor
from runtime.kernels import int8_numba, uniform_int8_numba
from runtime.checkpoints.packed_checkpoint import WEIGHTS, read_packed, save_packed

EPS32 = float(np.finfo(np.float32).eps)
MODES = [("row", "token", None), ("row", "token", 3.0), ("tensor", "tensor", None), ("row", "tensor", 3.0),
         ("tensor", "token", 0.5)]


def random_tensor(rng, n_out, n_in, weight_scales="row", activation="token", threshold=None):
    """An Int8Tensor of random codes in [-127, 127] and random positive scales."""
    qweight = rng.integers(-127, 128, (n_out, n_in)).astype(np.int8)
    scales = rng.uniform(0.001, 0.1, n_out if weight_scales == "row" else 1).astype(np.float32)
    return Int8Tensor(qweight, scales, weight_scales, activation, threshold)


def random_input(rng, m, n_in):
    """Activations with a few large columns, so a threshold of 3 picks some outliers."""
    x = inputs(rng, m, n_in)
    x[:, rng.choice(n_in, 3, replace=False)] *= 8
    return x


def test_reference_hand_example():
    # x = [127, -63.5, 0]: absmax 127, so sx = 1 and xq = [127, -64 (tie to even), 0]
    t = Int8Tensor(np.array([[1, 2, 3], [-1, 0, 1]], dtype=np.int8), np.array([0.5, 2.0], dtype=np.float32))
    y = t.matmul_reference(np.array([[127.0, -63.5, 0.0]], dtype=np.float32))
    assert y.tolist() == [[(127 - 128) * 0.5, -127 * 2.0]]
    assert np.array_equal(t.matmul(np.array([[127.0, -63.5, 0.0]], dtype=np.float32)), y)


def test_reference_decomposition_hand_example():
    # threshold 10: column 0 (|20| >= 10) goes through float with its dequantized weight column
    t = Int8Tensor(np.array([[2, 127]], dtype=np.int8), np.array([0.25], dtype=np.float32), outlier_threshold=10)
    x = np.array([[20.0, 1.0]], dtype=np.float32)
    # int8 part: x = [0, 1] -> sx = 1/127, xq = [0, 127]: 127*127 * (1/127) * 0.25; float part 20 * 2 * 0.25
    assert t.matmul_reference(x)[0, 0] == pytest.approx(127 * 0.25 + 20 * 0.5, rel=1e-6)


@pytest.mark.parametrize("weight_scales, activation, threshold", MODES)
@pytest.mark.parametrize("n_out, n_in", [(37, 61), (64, 200), (5, 1)])
@pytest.mark.parametrize("rows", [1, 3, 9, 70])
def test_numba_matmul_equals_reference_exactly(weight_scales, activation, threshold, n_out, n_in, rows):
    rng = np.random.default_rng(rows * 1000 + n_out)
    t = random_tensor(rng, n_out, n_in, weight_scales, activation, threshold)
    x = random_input(rng, rows, n_in) if n_in > 3 else inputs(rng, rows, n_in)
    y, ref = t.matmul(x), t.matmul_reference(x)
    outliers = fmt.outlier_columns(x, threshold)  # [in]
    if rows > 1 or not outliers.any():
        assert np.array_equal(y, ref)
        return
    # one row (decode) sums the outlier columns' float product in its own order, not BLAS's
    extra = np.abs(x[:, outliers]).astype(np.float64) @ np.abs(t.dequantize()[:, outliers]).T  # [1, out]
    assert np.all(np.abs(y - ref) <= (outliers.sum() + 2) * EPS32 * (extra + np.abs(ref)))


@pytest.mark.parametrize("per_tensor", [False, True])
def test_numba_pieces_equal_numpy(per_tensor):
    rng = np.random.default_rng(3)
    x = random_input(rng, 13, 77)
    x[4] = 0.0  # an all-zero token
    outliers = fmt.outlier_columns(x, 3.0)
    assert outliers.any() and not outliers.all()
    xq, sx = int8_numba.quantize_tokens(x, outliers, per_tensor)
    xq_ref, sx_ref = fmt.quantize_activations(x, "tensor" if per_tensor else "token", outliers)
    assert np.array_equal(xq, xq_ref) and np.array_equal(sx, sx_ref)
    assert np.abs(xq.astype(int)).max() == 127
    W = rng.integers(-127, 128, (29, 77)).astype(np.int8)
    exact = xq.astype(np.int64) @ W.astype(np.int64).T
    assert np.array_equal(int8_numba.int_matmul_decode(W, xq), exact)
    assert np.array_equal(int8_numba.int_matmul_prefill(W, xq), exact)
    for kernel in uniform_int8_numba.available_kernels():  # VNNI squares of rows, odd edges and a tail
        W2 = rng.integers(-127, 128, (29, 141)).astype(np.int8)  # [29, 141]: 2 chunks of 64 and 13 more
        xq2 = rng.integers(-127, 128, (37, 141)).astype(np.int8)  # [37, 141]
        exact2 = xq2.astype(np.int64) @ W2.astype(np.int64).T
        assert np.array_equal(int8_numba.int_matmul_prefill(W2, xq2, kernel), exact2)


@pytest.mark.parametrize("kernel", uniform_int8_numba.available_kernels())
@pytest.mark.parametrize("n_out, n_in", [(37, 61), (64, 640), (3, 1), (130, 64)])
@pytest.mark.parametrize("threshold", [None, 3.0])
def test_decode_matvec_equals_the_definition(kernel, n_out, n_in, threshold, monkeypatch):
    # the one-row kernel (VNNI chunks of 64 plus a scalar tail, or the portable loop), serial and parallel
    rng = np.random.default_rng(n_out + n_in)
    t = random_tensor(rng, n_out, n_in, "row", "token", threshold)
    x = random_input(rng, 1, n_in) if n_in > 3 else inputs(rng, 1, n_in)
    outliers = fmt.outlier_columns(x, threshold)  # [in]
    xq, sx = fmt.quantize_activations(x, "token", outliers)
    acc = xq.astype(np.int64) @ t.qweight.astype(np.int64).T  # [1, out] exact
    int_part = acc.astype(np.float32) * sx[:, None] * t.scales[None, :]  # [1, out]
    extra = x[:, outliers].astype(np.float64) @ t.dequantize()[:, outliers].T.astype(np.float64)  # [1, out]
    for parallel_bytes in (int8_numba.PARALLEL_BYTES, 0):
        monkeypatch.setattr(int8_numba, "PARALLEL_BYTES", parallel_bytes)
        y = int8_numba.matvec(t.qweight, t.scales, x[0], threshold, kernel)  # [out]
        if not outliers.any():
            assert np.array_equal(y, int_part[0])
        else:
            bound = (outliers.sum() + 2) * EPS32 * (np.abs(x[:, outliers]) @ np.abs(t.dequantize()[:, outliers]).T)
            assert np.all(np.abs(y - (int_part + extra)[0]) <= bound[0] + EPS32 * np.abs(int_part[0]))


def test_quantized_activations_within_half_a_step():
    x = inputs(4, 6, 50)
    xq, sx = fmt.quantize_activations(x, "token", np.zeros(50, dtype=bool))
    assert np.all(np.abs(xq * sx[:, None] - x) <= sx[:, None] / 2 * (1 + 1e-6))


@pytest.mark.parametrize("weight_scales, activation", [("row", "token"), ("tensor", "tensor")])
def test_threshold_zero_is_the_float_product(weight_scales, activation):
    rng = np.random.default_rng(5)
    t = random_tensor(rng, 33, 70, weight_scales, activation, threshold=0.0)
    x = inputs(rng, 1, 70), inputs(rng, 11, 70)
    W = t.dequantize().astype(np.float64)
    for xi in x:
        exact = xi.astype(np.float64) @ W.T
        bound = (70 + 2) * EPS32 * (np.abs(xi) @ np.abs(W).T)
        assert np.all(np.abs(t.matmul(xi) - exact) <= bound)
        assert np.all(np.abs(t.matmul_reference(xi) - exact) <= bound)


def test_matmul_keeps_leading_dims_and_checks_width():
    t = random_tensor(np.random.default_rng(6), 8, 16)
    x = inputs(7, 2, 3, 16)
    assert np.array_equal(t.matmul(x), t.matmul_reference(x.reshape(6, 16)).reshape(2, 3, 8))
    with pytest.raises(UserError):
        t.matmul(np.zeros((1, 15), dtype=np.float32))


@pytest.mark.parametrize("weight_scales, extra_bytes", [("row", lambda o, i: 4 * o), ("tensor", lambda o, i: 4)])
def test_bytes_on_disk_equal_the_formula(tmp_path, monkeypatch, weight_scales, extra_bytes):
    monkeypatch.setitem(FORMAT_CLASSES, "int8", "runtime.formats.int8.Int8Tensor")  # the registry entry
    n_out, n_in = 48, 576
    t = random_tensor(np.random.default_rng(8), n_out, n_in, weight_scales)
    expected = n_out * n_in + extra_bytes(n_out, n_in)
    assert t.nbytes == expected
    bits = 8 + 32 / n_in if weight_scales == "row" else 8 + 32 / (n_out * n_in)
    assert t.bits_per_weight == pytest.approx(bits)
    save_packed(tmp_path, {"quantization": {}}, {"w": t})
    raw = (tmp_path / WEIGHTS).read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    assert len(raw) - 8 - header_len == expected  # safetensors: 8-byte length, JSON header, then the data
    assert header["w.qweight"]["dtype"] == "I8"
    loaded = read_packed(tmp_path)
    assert isinstance(loaded["w"], Int8Tensor) and np.array_equal(loaded["w"].qweight, t.qweight)


def test_round_trip_through_tensors_and_meta():
    t = random_tensor(np.random.default_rng(9), 12, 20, "tensor", "tensor", 6.0)
    back = Int8Tensor.from_tensors(t.tensors(), json.loads(json.dumps(t.meta())))
    x = random_input(np.random.default_rng(10), 4, 20)
    assert back.meta() == t.meta() and np.array_equal(back.matmul(x), t.matmul(x))


def test_from_tensors_rejects_mismatches():
    t = random_tensor(np.random.default_rng(11), 12, 20)
    arrays, meta = t.tensors(), t.meta()
    bad_cases = [
        ({"qweight": arrays["qweight"]}, meta),
        ({**arrays, "extra": arrays["scales"]}, meta),
        ({**arrays, "qweight": arrays["qweight"].view(np.uint8)}, meta),
        ({**arrays, "scales": arrays["scales"][:5]}, meta),
        ({**arrays, "scales": arrays["scales"].astype(np.float16)}, meta),
        (arrays, {**meta, "weight_scales": "tensor"}),
        (arrays, {**meta, "weight_scales": "group"}),
        (arrays, {**meta, "shape": [12, 21]}),
        (arrays, {k: v for k, v in meta.items() if k != "shape"}),
        (arrays, {**meta, "activation": "channel"}),
        (arrays, {**meta, "outlier_threshold": "six"}),
        (arrays, {**meta, "outlier_threshold": -1.0}),
    ]
    for tensors, bad_meta in bad_cases:
        with pytest.raises(UserError):
            Int8Tensor.from_tensors(tensors, bad_meta)


@pytest.mark.gpu
@pytest.mark.parametrize("weight_scales, activation, threshold", MODES)
def test_cuda_kernels_equal_reference(cupy, weight_scales, activation, threshold):
    rng = np.random.default_rng(12)
    for n_out, n_in in [(37, 61), (64, 256), (300, 1000)]:
        t = random_tensor(rng, n_out, n_in, weight_scales, activation, threshold)
        on_gpu = t.to_device(cupy)
        assert np.array_equal(on_gpu.dequantize().get(), t.dequantize())
        for rows in (1, 9):
            x = random_input(rng, rows, n_in)
            y = on_gpu.matmul(cupy.asarray(x)).get()
            if threshold is None:
                assert np.array_equal(y, t.matmul_reference(x))
            else:  # the float part's sum runs in cuBLAS's order
                ref = t.matmul_reference(x)
                assert np.allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        with pytest.raises(UserError):
            on_gpu.matmul(x)


def test_vnni_decode_uses_the_byte_dot_product():
    if "avx512vnni" not in uniform_int8_numba.available_kernels():
        pytest.skip("the CPU lacks avx512vnni")
    rng = np.random.default_rng(9)
    t = random_tensor(rng, 16, 128)
    x = inputs(rng, 128)  # [in]
    fresh = numba.njit(int8_numba._matvec_serial.py_func)  # compiled here (not from the cache): asm at hand
    y = fresh(t.qweight, t.scales, x, -1.0, True)  # [out]
    assert np.array_equal(y, t.matmul_reference(x[None])[0])
    assert "vpdpbusd" in re.findall(r"\bvp\w+", "".join(fresh.inspect_asm().values()))
