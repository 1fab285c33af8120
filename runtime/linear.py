"""The single entry point of every projection in the forward pass.

`linear(x, w, b)` computes y = x Wᵀ + b for a float weight (a NumPy or CuPy
array [out, in]) or for any packed weight (a `PackedTensor`, which picks its
own NumPy / Numba / CUDA kernel). Swapping float weights for packed ones, or
for a wrapper that records inputs during calibration, never touches model.py.
A float16 weight on the GPU multiplies in half precision (cuBLAS, float32
accumulation) instead of being widened to float32 on every call. A float32
weight on the CPU multiplies on every core (runtime/kernels/float_numba.py:
BLAS itself runs on one thread).
A weight mapped from a file this project wrote has its recorded checksum
checked here, the first time it is used (runtime.checkpoints.content_hash).

`linear_many(x, weights, biases)` is the same for several weights sharing
the input (q/k/v, gate/up): packed weights whose format has `matmul_parts`
multiply in one kernel call (one parallel region, one quantization of x).

`one_row_products(weights, biases)` makes that choice once, for a decode step
that runs the same products every token: the function it returns goes
straight to the prepared kernel call. The choice on every call (activation
mode, prepared call, checks, output split) cost SmolLM2 about 15 us of each
27 us q/k/v product, 1.8 ms of an 8 ms token.
"""
from runtime.checkpoints.content_hash import run_pending
from runtime.device import is_cupy
from runtime.kernels import float_numba


def linear(x, w, b=None):
    """y [..., out] = x [..., in] @ w.T (+ b [out])."""
    run_pending(w)
    if not hasattr(w, "ndim"):
        y = w.matmul(x)  # [..., out]
    elif is_cupy(w) and w.dtype != x.dtype:
        y = (x.astype(w.dtype) @ w.T).astype(x.dtype)  # [..., out]
    elif float_numba.takes(x, w):
        y = float_numba.matmul(x, w)  # [..., out] on every core
    else:
        y = x @ w.T  # [..., out]
    if b is not None:
        y += b
    return y


def linear_many(x, weights, biases=None) -> list:
    """[x @ w.T (+ b) for w, b in zip(weights, biases)], x [..., in]; one call where the format fuses them."""
    for w in weights:
        run_pending(w)
    fused = getattr(weights[0], "matmul_parts", None)
    ys = fused(weights, x) if fused is not None else None
    if ys is None:
        return [linear(x, w, b) for w, b in zip(weights, biases or [None] * len(weights))]
    return _add_biases(ys, biases or [])


def _add_biases(ys: list, biases: list) -> list:
    """ys with each bias that is not None added in place (y [..., out] += b [out])."""
    for y, b in zip(ys, biases):
        if b is not None:
            y += b
    return ys


def one_row_products(weights, biases=None):
    """A function x [in] float32 (C-contiguous) -> [x @ w.T (+ b) for w, b in zip(weights, biases)], the kernel
    chosen now (the activation mode as it is now): one fused call where the format has it for these weights
    (`PackedTensor.one_row_product`), else `linear` one by one."""
    biases = list(biases or [None] * len(weights))
    for w in weights:
        run_pending(w)
    fused = getattr(weights[0], "one_row_product", None)
    product = fused(weights) if fused is not None else None
    if product is None:
        return lambda x: [linear(x, w, b) for w, b in zip(weights, biases)]
    if all(b is None for b in biases):
        return product
    return lambda x: _add_biases(product(x), biases)
