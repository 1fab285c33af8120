"""The training pass's RMSNorm and SwiGLU kernels (runtime/kernels/norm_swiglu_numba.py) against NumPy
references in float64, the backward ones also against central differences of the forward ones.

Tolerance: float32 rows of up to 1536 values and exp32's relative error (3e-7): 2e-5 relative to the largest
value of each output.
"""
import numpy as np
import pytest

from runtime.kernels.norm_swiglu_numba import rms_norm, rms_norm_backward, swiglu, swiglu_backward

TOLERANCE = 2e-5


def close(got, expected):
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=TOLERANCE * np.abs(expected).max(), rtol=0)


@pytest.mark.parametrize("shape", [(2, 7, 576), (1, 1, 3), (5, 33)])
def test_rms_norm_and_its_backward(shape):
    rng = np.random.default_rng(shape[-1])
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    weight = rng.standard_normal(shape[-1]).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    eps = 1e-5
    x64, w64, dy64 = x.astype(np.float64), weight.astype(np.float64), dy.astype(np.float64)
    r64 = 1 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + eps)  # [..., 1]
    n, r = rms_norm(x, weight, eps)
    close(n, x64 * r64 * w64)
    close(r, r64)
    u = dy64 * w64
    close(rms_norm_backward(x, weight, r, dy), r64 * u - x64 * r64 ** 3 * (u * x64).mean(axis=-1, keepdims=True))


def test_rms_norm_backward_is_the_gradient_of_the_forward():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16))
    weight, dy = rng.standard_normal(16), rng.standard_normal((3, 16))
    loss = lambda v: float((rms_norm(v.astype(np.float32), weight.astype(np.float32), 1e-5)[0] * dy).sum())
    h = 1e-2
    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        numeric[index] = (loss(x + step) - loss(x - step)) / (2 * h)
    _, r = rms_norm(x.astype(np.float32), weight.astype(np.float32), 1e-5)
    got = rms_norm_backward(x.astype(np.float32), weight.astype(np.float32), r, dy.astype(np.float32))
    np.testing.assert_allclose(got, numeric, atol=2e-3 * np.abs(numeric).max(), rtol=0)


@pytest.mark.parametrize("shape", [(1, 512, 1536), (3, 5), (7,)])
def test_swiglu_and_its_backward(shape):
    rng = np.random.default_rng(len(shape))
    gate = (rng.standard_normal(shape) * 4).astype(np.float32)
    gate.reshape(-1)[:2] = [-120.0, 120.0]  # far out: σ saturates to 0 and 1 without overflow
    up, dact = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    g64 = gate.astype(np.float64)
    sig64 = 1 / (1 + np.exp(-g64))
    sig, act = swiglu(gate, up)
    close(sig, sig64)
    close(act, g64 * sig64 * up)
    dgate, dup = swiglu_backward(dact, gate, up, sig)
    close(dgate, dact * up * sig64 * (1 + g64 * (1 - sig64)))
    close(dup, dact * g64 * sig64)


def test_swiglu_takes_strided_inputs():
    rng = np.random.default_rng(1)
    both = rng.standard_normal((4, 10)).astype(np.float32)
    gate, up = both[:, :5], both[:, 5:]  # views that are not C-contiguous
    sig, act = swiglu(gate, up)
    expected_sig, expected_act = swiglu(gate.copy(), up.copy())
    np.testing.assert_array_equal(sig, expected_sig)
    np.testing.assert_array_equal(act, expected_act)
