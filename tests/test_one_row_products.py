"""The decode step's once-chosen products (runtime/linear.py `one_row_products`) against each weight's own
`matmul` of the same row, for every format that has a fused one-row product, and the fallback for the rest.

Both sides run the same kernels with the same activation quantization, so they agree to float32 summation
order; what is checked is that the function chosen once multiplies by the right weights, splits the fused
output at the right places, adds the biases, and keeps following the activation mode it was made under.
"""
import numpy as np
import pytest

from bench_models import random_packed
from conftest import assert_close, inputs
from runtime.kernels.uniform_int8_numba import available_kernels
from runtime.linear import one_row_products

# (tag, in): in a multiple of 576 and of the formats' blocks, wide enough for E8P's whole chunks and a tail
CASES = [("rtn4g128", 1152), ("rtn2g64", 1152), ("nf4", 1152), ("spqr4g32", 1152), ("quipsharp2", 1088),
         ("int8", 1152), ("quip2", 1152)]
OUTS = (48, 16, 16)  # q, k, v-like parts sharing the input (random SpQR parts have their own column orders,
# so they are not fused: one product each)


@pytest.mark.parametrize("tag, n_in", CASES)
@pytest.mark.parametrize("mode", ["int8", "float"])
def test_fused_products_equal_each_weights_own_product(tag, n_in, mode, monkeypatch):
    monkeypatch.setenv("QLLM_ACTIVATIONS", mode)
    parts = [random_packed(tag, (n_out, n_in), seed=k) for k, n_out in enumerate(OUTS)]
    biases = [None, np.arange(OUTS[1], dtype=np.float32), None]  # [out] for the second part
    x = inputs(len(tag) + n_in, 1, n_in)[0]  # [in]
    if mode == "int8" and "avx512vnni" in available_kernels() and tag != "quip2":  # QuIP has no integer kernel
        assert parts[0].one_row_product(parts[:1]) is not None  # the prepared path, not the fallback
    product = one_row_products(parts, biases)
    for _ in range(2):  # the same function again: the prepared call is reused
        ys = product(x)
        assert [y.shape for y in ys] == [(n,) for n in OUTS]
        for y, w, b in zip(ys, parts, biases):
            expected = w.matmul(x[None])[0] + (0 if b is None else b)  # [out]
            assert_close(y, expected.astype(np.float32))


def test_float_weights_take_the_plain_product():
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((n, 64)).astype(np.float32) for n in (8, 4)]  # [out, in] each
    x = rng.standard_normal(64).astype(np.float32)  # [in]
    ys = one_row_products(weights, [np.ones(8, dtype=np.float32), None])(x)
    np.testing.assert_allclose(ys[0], weights[0] @ x + 1, rtol=1e-6)
    np.testing.assert_allclose(ys[1], weights[1] @ x, rtol=1e-6)
