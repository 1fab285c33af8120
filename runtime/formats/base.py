"""The interface every packed weight format implements.

A format is a packed-tensor layout plus the kernels that multiply by it (see
DESIGN.md: methods choose codes, formats run them). The forward pass never
looks inside a packed tensor: `runtime.linear.linear` calls `matmul`, and the
checkpoint writer calls `tensors` / `meta`; the reader rebuilds the object with
`from_tensors`.
"""
from __future__ import annotations

import numpy as np

from runtime.device import is_cupy
from runtime.errors import UserError


class PackedTensor:
    """A quantized weight W [out, in] stored in a packed layout.

    Subclasses set `FORMAT` (the name written in the saved file's metadata),
    keep their codes in `self.qweight`, and implement every method below.
    """

    FORMAT = ""

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the float weight this stands for."""
        raise NotImplementedError

    def dequantize(self):
        """The float32 weight [out, in] the codes decode to (NumPy reference)."""
        raise NotImplementedError

    def matmul(self, x):
        """y = x @ W.T for x [..., in] float32 -> y [..., out] float32 (leading axes flattened for `matmul_rows`)."""
        on_gpu = self.check_input(x)
        n_out, n_in = self.shape
        rows = x.reshape(-1, n_in) if on_gpu else np.ascontiguousarray(x, dtype=np.float32).reshape(-1, n_in)
        return self.matmul_rows(rows, on_gpu).reshape(*x.shape[:-1], n_out)

    def matmul_rows(self, x, on_gpu: bool):
        """y [m, out] for x [m, in] (contiguous float32 on the CPU).

        Picks the kernel: CuPy input -> CUDA; NumPy input -> Numba, fused
        dequantize-and-multiply for a few rows, dequantize + BLAS (or a
        blocked kernel) for many rows.
        """
        raise NotImplementedError

    def tensors(self) -> dict:
        """Arrays to save, keyed by a suffix ("qweight", "scales", ...)."""
        raise NotImplementedError

    def meta(self) -> dict:
        """JSON-serialisable parameters (bits, group, ...) saved beside the arrays."""
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict) -> "PackedTensor":
        """Rebuild from what `tensors` and `meta` returned; raise UserError on a mismatch."""
        raise NotImplementedError

    @classmethod
    def require_meta(cls, meta: dict, keys) -> None:
        """UserError naming the keys of `keys` that the saved metadata `meta` lacks (for `from_tensors`)."""
        missing = [k for k in keys if k not in meta]
        if missing:
            raise UserError(f"{cls.FORMAT} tensor metadata lacks {', '.join(missing)}; re-quantize the model")

    def check_input(self, x) -> bool:
        """UserError unless x [..., in] fits this weight and lives on its device; True for CuPy input."""
        n_in = self.shape[1]
        if x.shape[-1] != n_in:
            raise UserError(f"{self.FORMAT} matmul: input has {x.shape[-1]} features, the weight expects {n_in}")
        on_gpu = is_cupy(x)
        if on_gpu != is_cupy(self.qweight):
            raise UserError(f"{self.FORMAT} matmul: input and weight are on different devices; "
                            "move the weight with to_device(cupy) (or the input to NumPy)")
        return on_gpu

    @property
    def nbytes(self) -> int:
        """Bytes of all stored arrays (codes and side data)."""
        return sum(int(a.nbytes) for a in self.tensors().values())

    def to_device(self, xp) -> "PackedTensor":
        """A copy whose arrays live on the device of array module `xp` (numpy or cupy)."""
        raise NotImplementedError
