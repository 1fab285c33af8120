"""Numba (and, with a GPU, CUDA) kernels of the uniform format against its NumPy reference.

These are the float-activation kernels (QLLM_ACTIVATIONS=float for every
test here); the int8-activation kernels are in test_uniform_int8_kernels.py.

Tolerance: conftest's assert_close, ||y - y_ref|| <= 1e-5 ||y_ref|| (float32 sums in
another order; the kernels fold scale and zero once per group). Inputs have a
mean of 0.5, as after an activation, so the folded zero term matters.
"""
import numpy as np
import pytest

from conftest import assert_close, assert_device_matches_reference, inputs
from runtime.formats.uniform import UniformTensor, group_index
from runtime.kernels import uniform_numba

BITS = (2, 3, 4, 8)
# (n_out, n_in, group_size, per_tensor): odd outputs, inputs not a multiple of 32 or of the group
GRIDS = [(67, 200, 32, False), (67, 200, 128, False), (67, 200, -1, False), (33, 96, -1, True)]


@pytest.fixture(autouse=True)
def float_activations(monkeypatch):
    monkeypatch.setenv("QLLM_ACTIVATIONS", "float")


def make_tensor(seed, n_out, n_in, bits, group_size, sym=False, per_tensor=False, act_order=False):
    rng = np.random.default_rng(seed)
    n_groups = 1 if group_size == -1 else -(-n_in // group_size)
    codes = rng.integers(0, 2**bits, size=(n_out, n_in))  # [out, in]
    scales = rng.uniform(0.01, 0.1, size=(n_groups, n_out)).astype(np.float16)  # [n_groups, out]
    zeros = rng.integers(0, 2**bits, size=(n_groups, n_out))  # [n_groups, out]
    if sym:
        zeros[:] = 2 ** (bits - 1)
    if per_tensor:
        scales[:], zeros[:] = scales[0, 0], zeros[0, 0]
    g_idx = group_index(n_in, group_size)
    if act_order:
        g_idx = np.empty(n_in, dtype=np.int32)
        g_idx[rng.permutation(n_in)] = np.arange(n_in) // group_size
    return UniformTensor.from_codes(codes, scales, zeros, bits=bits, group_size=group_size, sym=sym,
                                    per_tensor=per_tensor, g_idx=g_idx)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n_out, n_in, group_size, per_tensor", GRIDS)
@pytest.mark.parametrize("sym", [False, True])
def test_numba_matches_reference(bits, n_out, n_in, group_size, per_tensor, sym):
    packed = make_tensor(bits, n_out, n_in, bits, group_size, sym=sym, per_tensor=per_tensor)
    for rows in (1, 5):  # decode kernel, prefill path
        x = inputs(rows, rows, n_in, mean=0.5)
        assert_close(packed.matmul(x), packed.matmul_reference(x))


@pytest.mark.parametrize("bits", BITS)
def test_numba_act_order(bits):
    packed = make_tensor(10 + bits, 45, 160, bits, 32, act_order=True)
    assert packed.act_order
    for rows in (1, 3):
        x = inputs(rows, rows, 160, mean=0.5)
        assert_close(packed.matmul(x), packed.matmul_reference(x))


@pytest.mark.parametrize("bits", BITS)
def test_numba_many_chunks_and_tiles(bits, monkeypatch):
    # more outputs than one parallel chunk; a prefill tile smaller than the output
    monkeypatch.setattr(uniform_numba, "PREFILL_TILE", 64 * 512)
    packed = make_tensor(20 + bits, 1000, 512, bits, 128)
    for rows in (1, 4):
        x = inputs(rows, rows, 512, mean=0.5)
        assert_close(packed.matmul(x), packed.matmul_reference(x))


@pytest.mark.parametrize("bits", BITS)
def test_numba_dequantize_equals_reference(bits):
    packed = make_tensor(30 + bits, 67, 200, bits, 64)
    w_t = uniform_numba.dequantize_storage(packed)  # [224, 67] storage order, padded
    np.testing.assert_allclose(w_t[:200].T, packed.dequantize(), rtol=1e-6, atol=1e-6)


def test_leading_dimensions_and_float64_input():
    packed = make_tensor(40, 35, 64, 4, 32)
    x = np.random.default_rng(41).standard_normal((2, 3, 64))  # float64
    y = packed.matmul(x)
    assert y.shape == (2, 3, 35)
    assert_close(y.reshape(6, 35), packed.matmul_reference(x.reshape(6, 64).astype(np.float32)))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size, act_order", [(32, False), (128, False), (-1, False), (32, True)])
def test_cuda_matches_reference(cupy, bits, group_size, act_order):
    """Every ROWS variant of the matvec kernel (1, 2, 4, 8 rows; 9 and 16 rows in two launches), the cuBLAS path
    (17 rows), four columns per thread (1000 outputs) and one (67: not a multiple of four)."""
    for n_out in (1000, 67):
        packed = make_tensor(50 + bits, n_out, 200, bits, group_size, act_order=act_order)
        assert_device_matches_reference(cupy, packed, row_counts=(1, 2, 3, 4, 8, 9, 16, 17))


@pytest.mark.gpu
def test_cuda_matvec_many_slices(cupy):
    """An input long enough that the matvec splits it over many thread blocks (split-K, atomicAdd into y) and
    stages a partial last slice."""
    assert_device_matches_reference(cupy, make_tensor(70, 256, 4000, 4, 128), row_counts=(1, 5, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
def test_cuda_dequantize_equals_reference(cupy, bits):
    from runtime.kernels import uniform_cuda

    packed = make_tensor(60 + bits, 67, 200, bits, 64)
    w_t = cupy.asnumpy(uniform_cuda.dequantize_storage(packed.to_device(cupy)))  # [224, 67]
    np.testing.assert_array_equal(w_t[:200].T, packed.dequantize())
