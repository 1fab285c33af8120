"""The training pass's softmax kernels (runtime/kernels/softmax_numba.py) against NumPy references in float64.

Tolerance: exp32's relative error (3e-7) and float32 sums over a row: 1e-6 absolute on probabilities and
gradients (values at most 1), 1e-6 relative on the losses.
"""
import numpy as np
import pytest

from runtime.kernels.softmax_numba import causal_softmax_, causal_softmax_backward_, cross_entropy_


def reference_causal_softmax(scores: np.ndarray, scale: float) -> np.ndarray:
    """softmax(scale · s + mask) in float64, the future keys masked with -inf."""
    T = scores.shape[-1]
    s = scores.astype(np.float64) * scale + np.triu(np.full((T, T), -np.inf), k=1)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("shape", [(1, 3, 3, 37, 37), (2, 1, 4, 1, 1), (1, 2, 1, 130, 130)])
def test_causal_softmax_and_its_backward(shape):
    rng = np.random.default_rng(shape[-1])
    scores = (rng.standard_normal(shape) * 6).astype(np.float32)
    scale = 1 / np.sqrt(64)
    expected = reference_causal_softmax(scores, scale)
    p = causal_softmax_(scores, scale)
    assert p is scores and p.dtype == np.float32
    np.testing.assert_allclose(p, expected, atol=1e-6, rtol=0)
    assert (np.triu(np.ones(shape[-2:]), k=1).astype(bool) <= (p == 0)).all()  # the future: exactly 0
    dp = rng.standard_normal(shape).astype(np.float32)
    p64 = p.astype(np.float64)
    expected = scale * p64 * (dp - (dp * p64).sum(axis=-1, keepdims=True))
    future = np.broadcast_to(np.triu(np.ones(shape[-2:], dtype=bool), k=1), shape)
    dp[future] = np.nan  # the attention leaves dp's future entries unwritten: they must not be read
    got = causal_softmax_backward_(p, dp, scale)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert (got[future] == 0).all()


def test_cross_entropy_loss_and_gradient():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((7, 49152)) * 8).astype(np.float32)
    logits[3, 5] = 80.0  # a dominant logit: the maximum is subtracted first
    targets = rng.integers(0, 49152, 7)
    targets[3] = 5
    z = logits.astype(np.float64)
    top = z.max(axis=1, keepdims=True)
    total = np.exp(z - top).sum(axis=1)
    expected_loss = np.log(total) + top[:, 0] - z[np.arange(7), targets]
    expected_grad = np.exp(z - top) / total[:, None]
    expected_grad[np.arange(7), targets] -= 1
    losses = cross_entropy_(logits, targets)
    assert losses.dtype == np.float64
    np.testing.assert_allclose(losses, expected_loss, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits, expected_grad, atol=1e-6, rtol=0)
