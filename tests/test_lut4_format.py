"""The lut4 format (runtime/formats/lut4.py) and its Numba / CUDA kernels.

The NumPy reference is checked against the layout written out by hand here;
the float-activation kernels are checked against the reference within a floating-point
summation bound; the byte size against QLoRA's bits-per-weight figures.
"""
import numpy as np
import pytest

import nf4
from conftest import inputs
from runtime.errors import UserError
from runtime.formats.lut4 import DQ_BLOCK_SIZE, DQ_MAX_ERROR, Lut4Tensor, dynamic_map, pack_nibbles
from runtime.kernels import lut4_numba

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(autouse=True)
def float_activations(monkeypatch):
    """These are the float-activation kernels (the int8 decode path: test_lut4_int8_kernels.py)."""
    monkeypatch.setenv("QLLM_ACTIVATIONS", "float")


def random_tensor(rng, n_out, n_in, block_size=64, double_quant=False):
    """A Lut4Tensor of random bytes, table and absmax (any bytes are valid codes)."""
    qweight = rng.integers(0, 256, (n_out, n_in // 2), dtype=np.uint8)
    table = np.sort(rng.uniform(-1, 1, 16)).astype(np.float32)
    n_blocks = (n_out, n_in // block_size)
    if not double_quant:
        absmax = rng.uniform(0.01, 2.0, n_blocks).astype(np.float32)
        return Lut4Tensor(qweight, table, block_size, absmax=absmax)
    n_runs = -(-n_blocks[0] * n_blocks[1] // DQ_BLOCK_SIZE)
    return Lut4Tensor(qweight, table, block_size,
                      absmax_q=rng.integers(0, 256, n_blocks, dtype=np.uint8),
                      absmax_scale=rng.uniform(0.01, 0.5, n_runs).astype(np.float32),
                      absmax_mean=np.array([0.7], dtype=np.float32))


def spelled_out_dequantize(t: Lut4Tensor) -> np.ndarray:
    """W from the layout in the format's docstring, written out independently of its code."""
    n_out, n_in = t.shape
    codes = np.stack([t.qweight >> 4, t.qweight & 15], axis=-1).reshape(n_out, n_in)  # high nibble first
    if t.double_quant:
        flat_block = np.arange(t.absmax_q.size).reshape(t.absmax_q.shape)
        absmax = dynamic_map()[t.absmax_q] * t.absmax_scale[flat_block // 256] + t.absmax_mean[0]
    else:
        absmax = t.absmax
    block_of_column = np.arange(n_in) // t.block_size
    return t.table[codes] * absmax[:, block_of_column]


def assert_within_summation_bound(y, x, W):
    """|y - x @ W.T| within the worst-case float32 summation bound (n + 2) eps (|x| @ |W|.T).

    Not conftest's relative-norm assert_close: the reference here is the exact (float64) product of the
    dequantized W, and every output is held to the rigorous bound of float32 summation in any order.
    """
    x2 = x.reshape(-1, W.shape[1]).astype(np.float64)
    exact = x2 @ W.T.astype(np.float64)
    bound = (W.shape[1] + 2) * EPS32 * (np.abs(x2) @ np.abs(W.T).astype(np.float64))
    assert np.all(np.abs(y.reshape(exact.shape) - exact) <= bound + 1e-30)


def test_nibble_order_high_first():
    codes = np.array([[0x1, 0x2, 0xA, 0xF, 0x0, 0x7, 0x3, 0xC]], dtype=np.uint8)
    assert pack_nibbles(codes).tolist() == [[0x12, 0xAF, 0x07, 0x3C]]
    table = np.arange(16, dtype=np.float32)
    t = Lut4Tensor(pack_nibbles(codes), table, 8, absmax=np.ones((1, 1), dtype=np.float32))
    assert t.dequantize().tolist() == [[1, 2, 10, 15, 0, 7, 3, 12]]


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_matches_layout(double_quant):
    t = random_tensor(np.random.default_rng(1), 37, 256, block_size=32, double_quant=double_quant)
    assert np.array_equal(t.dequantize(), spelled_out_dequantize(t))


def test_dynamic_map_structure():
    """Dettmers 2016 dynamic tree map, signed: decade 10**(k-6) holds 2**k midpoints of [0.1, 1] per sign."""
    dmap = dynamic_map().astype(np.float64)
    assert dmap.shape == (256,) and np.all(np.diff(dmap) > 0)
    assert dmap[-1] == 1.0 and 0.0 in dmap
    assert dmap[0] == pytest.approx(-(1 + (1 - 0.9 / 64)) / 2, rel=1e-6)  # -0.99296875
    assert dmap[dmap > 0][0] == pytest.approx(0.55e-6, rel=1e-6)
    for k in range(7):
        in_decade = (np.abs(dmap) >= 0.1 * 10.0 ** (k - 6)) & (np.abs(dmap) < 10.0 ** (k - 6))
        assert np.count_nonzero(in_decade & (dmap > 0)) == 2**k
        assert np.count_nonzero(in_decade & (dmap < 0)) == 2**k
    gaps = np.diff(np.concatenate([[-1.0], dmap]))  # [-1, 1] is the normalized range
    assert gaps.max() == pytest.approx(2 * DQ_MAX_ERROR, rel=1e-5)


@pytest.mark.parametrize("double_quant, expected", [(False, 4.5), (True, 4.127)])
def test_bits_per_weight_from_bytes(double_quant, expected):
    """QLoRA §3: 4.5 bits per weight at block size 64, 4.127 with double quantization."""
    W = np.random.default_rng(2).standard_normal((512, 4096)).astype(np.float32)
    t = nf4.quantize(W, nf4.NF4Params(block_size=64, double_quant=double_quant))
    n_bytes = sum(a.nbytes for a in t.tensors().values())
    assert t.nbytes == n_bytes
    assert 8 * n_bytes / W.size == pytest.approx(expected, abs=0.001)
    assert t.bits_per_weight == 8 * n_bytes / W.size


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("n_out, n_in, block_size, rows", [
    (1, 64, 64, 1), (37, 128, 64, 1), (129, 576, 64, 3), (3, 24, 8, 2), (1031, 192, 32, 1),
    (1031, 192, 32, 9), (17, 4096, 128, 33), (576, 1536, 64, 1),
])
def test_numba_kernels_match_reference(double_quant, n_out, n_in, block_size, rows, monkeypatch):
    monkeypatch.setattr(lut4_numba, "PREFILL_TILE", 100 * n_in)  # several prefill tiles, the last one short
    rng = np.random.default_rng(n_out * 7 + rows)
    t = random_tensor(rng, n_out, n_in, block_size, double_quant)
    W = t.dequantize()  # [out, in]
    assert np.array_equal(lut4_numba.dequantize(t), W)
    assert np.array_equal(lut4_numba.dequantize(t, row0=n_out // 2, rows=n_out - n_out // 2), W[n_out // 2:])
    x = inputs(rng, rows, n_in)
    assert_within_summation_bound(lut4_numba.matmul_fused(t, x), x, W)
    assert_within_summation_bound(lut4_numba.matmul_prefill(t, x), x, W)
    assert_within_summation_bound(t.matmul(x), x, W)


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_cpu_equals_the_reference(double_quant):
    packed = random_tensor(np.random.default_rng(5), 37, 192, 64, double_quant)
    np.testing.assert_array_equal(packed.dequantize_cpu(), packed.dequantize())


def test_matmul_keeps_leading_dims():
    rng = np.random.default_rng(3)
    t = random_tensor(rng, 40, 128)
    x = inputs(rng, 2, 5, 128)
    y = t.matmul(x)
    assert y.shape == (2, 5, 40)
    assert_within_summation_bound(y, x, t.dequantize())
    assert t.matmul(x[0, 0]).shape == (40,)
    with pytest.raises(UserError):
        t.matmul(np.ones((2, 127), dtype=np.float32))


@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_through_tensors_and_meta(double_quant):
    t = random_tensor(np.random.default_rng(4), 24, 512, double_quant=double_quant)
    back = Lut4Tensor.from_tensors(t.tensors(), t.meta())
    assert back.meta() == t.meta() and back.shape == (24, 512)
    assert np.array_equal(back.dequantize(), t.dequantize())
    assert np.array_equal(t.to_device(np).dequantize(), t.dequantize())


def test_from_tensors_rejects_mismatches():
    plain = random_tensor(np.random.default_rng(5), 8, 128)
    dq = random_tensor(np.random.default_rng(5), 8, 128, double_quant=True)
    arrays, meta = plain.tensors(), plain.meta()
    cases = [
        (arrays, {**meta, "shape": [8, 256]}),
        (arrays, {**meta, "double_quant": True}),
        (dq.tensors(), meta),
        (arrays, {**meta, "block_size": 32}),
        (arrays, {**meta, "block_size": 12}),
        (arrays, {k: v for k, v in meta.items() if k != "block_size"}),
        ({**arrays, "absmax": arrays["absmax"].astype(np.float16)}, meta),
        ({**arrays, "table": arrays["table"][:8]}, meta),
        ({**arrays, "qweight": arrays["qweight"][:, :-4]}, meta),
        ({k: v for k, v in arrays.items() if k != "table"}, meta),
        ({**dq.tensors(), "absmax_scale": dq.absmax_scale[:0]}, dq.meta()),
        (dq.tensors(), {**dq.meta(), "double_quant_block_size": 128}),
    ]
    for tensors, bad_meta in cases:
        with pytest.raises(UserError):
            Lut4Tensor.from_tensors(tensors, bad_meta)


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [False, True])
def test_cuda_kernels_match_reference(cupy, double_quant):
    rng = np.random.default_rng(6)
    for n_out, n_in, block_size in [(1, 64, 64), (1031, 192, 32), (577, 1536, 64), (30, 24, 8)]:
        t = random_tensor(rng, n_out, n_in, block_size, double_quant)
        W = t.dequantize()
        on_gpu = t.to_device(cupy)
        assert np.array_equal(on_gpu.dequantize().get(), W)
        for rows in (1, 3, 17):
            x = inputs(rng, rows, n_in)
            assert_within_summation_bound(on_gpu.matmul(cupy.asarray(x)).get(), x, W)
        with pytest.raises(UserError):
            on_gpu.matmul(x)
