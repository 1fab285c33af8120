"""The single entry point of every projection in the forward pass.

`linear(x, w, b)` computes y = x Wᵀ + b for a float weight (a NumPy or CuPy
array [out, in]) or for any packed weight (a `PackedTensor`, which picks its
own NumPy / Numba / CUDA kernel). Swapping float weights for packed ones, or
for a wrapper that records inputs during calibration, never touches model.py.
"""


def linear(x, w, b=None):
    """y [..., out] = x [..., in] @ w.T (+ b [out])."""
    y = x @ w.T if hasattr(w, "ndim") else w.matmul(x)  # [..., out]
    if b is not None:
        y += b
    return y
