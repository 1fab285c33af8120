"""The interface every packed weight format implements.

A format is a packed-tensor layout plus the kernels that multiply by it (the
design: methods choose codes, formats run them). The forward pass never
looks inside a packed tensor: `runtime.linear.linear` calls `matmul`, and the
checkpoint writer calls `tensors` / `meta`; the reader rebuilds the object with
`from_tensors`.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from runtime.device import is_cupy
from runtime.errors import UserError


def activation_mode() -> tuple[str, str]:
    """(mode, kernel) of the CPU products, from the environment.

    For the formats with int8-activation decode kernels (uniform, lut4). QLLM_ACTIVATIONS: `int8`
    (default) quantizes the activation of a one-row product (decode) to int8 per run of 32 and
    multiplies in integer lanes where the CPU has SIMD tiles for the format's codes (float activations
    otherwise); more rows (prefill) of those weights multiply in integers with two-byte activations
    (float accuracy; runtime/kernels/uniform_prefill_numba.py) or through float tiles and BLAS; `int8-all` takes every row through the int8 kernel, one at a time (slow: for measuring
    the accuracy of the decode path with a perplexity run); `float` keeps float activations everywhere
    (the reference kernel). QLLM_INT8_KERNEL: `avx512vnni`, `avx2` or `portable` (default: the
    best the CPU has; one it lacks is refused).
    """
    return _checked_mode(os.environ.get("QLLM_ACTIVATIONS", "int8"), os.environ.get("QLLM_INT8_KERNEL"))


@functools.lru_cache(maxsize=None)
def _checked_mode(mode: str, kernel: str | None) -> tuple[str, str]:
    """`activation_mode` of these variables' values (checked once per pair of values)."""
    from runtime.kernels.uniform_int8_numba import available_kernels

    kernel = kernel or available_kernels()[0]
    if mode not in ("int8", "int8-all", "float"):
        raise UserError(f"QLLM_ACTIVATIONS={mode!r}: use int8, int8-all or float")
    if kernel not in available_kernels():
        raise UserError(f"QLLM_INT8_KERNEL={kernel!r}: this CPU runs {', '.join(available_kernels())}")
    return mode, kernel


def quantize_activation(x: np.ndarray, perm: np.ndarray | None = None, levels: int | None = None) -> np.ndarray:
    """x_hat [m, in]: each row of x [m, in] float32 as the int8-activation kernels see it.

    In storage order (perm; None: column order), zero-padded to whole runs of 32, each run quantized
    as llama.cpp's Q8_0 (runtime/kernels/quant_activations_numba.py: d = max|x| / 127, q = rint(x * (1/d))
    in float32; levels LEVELS16: / 32639, the two-byte activations of the integer prefill), then
    dequantized to d * q and put back in column order. The NumPy reference of the integer kernels is
    x_hat @ W.T.
    """
    from runtime.kernels.quant_activations_numba import BLOCK as RUN, LEVELS8

    levels = LEVELS8 if levels is None else levels

    m, n_in = x.shape
    runs = -(-n_in // RUN)
    stored = np.zeros((m, runs * RUN), dtype=np.float32)  # [m, runs*32]
    stored[:, :n_in] = x if perm is None else x[:, perm]
    blocks = stored.reshape(m, runs, RUN)  # [m, runs, 32]
    d = np.abs(blocks).max(axis=2) / np.float32(levels)  # [m, runs]
    inverse = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d > 0)  # [m, runs]
    x_hat = (np.rint(blocks * inverse[..., None]) * d[..., None]).reshape(m, -1)[:, :n_in]  # [m, in] storage
    if perm is None:
        return x_hat
    out = np.empty_like(x_hat)  # [m, in]
    out[:, perm] = x_hat
    return out


def frozen(a):
    """A read-only view of a NumPy array (packed tensors never change; memory-mapped ones cannot);
    CuPy arrays as they are."""
    if is_cupy(a):
        return a
    view = np.asarray(a).view()
    view.flags.writeable = False
    return view


class PackedTensor:
    """A quantized weight W [out, in] stored in a packed layout.

    Subclasses set `FORMAT` (the name written in the saved file's metadata),
    keep their codes in `self.qweight`, and implement every method below.
    """

    FORMAT = ""
    # Whether the one-row CUDA product launches only what CuPy lets a CUDA graph capture (custom kernels and
    # CuPy array code; no cuBLAS): the GPU decode step is then recorded once (runtime/cuda_graph_step.py).
    CUDA_GRAPH = True

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the float weight this stands for (a format that keeps no such
        attributes derives them from its arrays)."""
        return self.out_features, self.in_features

    @property
    def bits_per_weight(self) -> float:
        """8 * stored bytes / number of weights: codes and all side data (scales, zeros, statistics, tables,
        permutations, outliers) the format stores."""
        n_out, n_in = self.shape
        return 8.0 * self.nbytes / (n_out * n_in)

    def dequantize(self):
        """The float32 weight [out, in] the codes decode to (NumPy reference)."""
        raise NotImplementedError

    def dequantize_cpu(self) -> np.ndarray:
        """`dequantize` of NumPy arrays through the format's Numba kernels where it has them (equal to the
        reference within float32 rounding), on the calling thread; what a caller that needs the whole float
        matrix runs (training's frozen products, beside BLAS on every core). C or Fortran order, as the
        format's decoder writes it."""
        return np.asarray(self.dequantize(), dtype=np.float32)

    def matmul(self, x):
        """y = x @ W.T for x [..., in] float32 -> y [..., out] float32 (leading axes flattened for `matmul_rows`);
        on the CPU the rows `activation_mode` picks (by default one row: decode) go through the
        int8-activation kernel where the format has one (`int8_weight`)."""
        on_gpu = self.check_input(x)
        n_out, n_in = self.shape
        rows = x.reshape(-1, n_in) if on_gpu else np.ascontiguousarray(x, dtype=np.float32).reshape(-1, n_in)
        y = None if on_gpu else self._matmul_int8(rows)
        if y is None:
            y = self.matmul_rows(rows, on_gpu)  # [m, out]
        return y.reshape(*x.shape[:-1], n_out)

    def int8_codes(self):
        """(bits, table) of the codes the int8-activation decode kernel would read from this weight (table: whether
        they index a lookup table), or None where the format, this weight's grid or its device has no such
        kernel. Cheap: it decides whether `int8_weight` is worth building."""
        return None

    def int8_weight(self):
        """This weight as the int8-activation decode kernel takes it (a KernelWeight of
        runtime/kernels/uniform_int8_numba.py), or None: the format multiplies float activations only."""
        return None

    def int8_decodes(self, mode: str, kernel: str) -> bool:
        """Whether one-row products of this weight go through the int8-activation kernel under `mode` and `kernel`
        (`activation_mode`): `int8-all` wherever the format has the kernel, `int8` where `kernel` also has SIMD
        tiles for its codes (the portable lanes are slower than float activations there)."""
        codes = self.int8_codes()
        if codes is None or mode == "float":
            return False
        from runtime.kernels.uniform_int8_numba import simd_tiles
        return mode == "int8-all" or simd_tiles(codes[0], kernel, lut=codes[1])

    def _matmul_int8(self, rows):
        """y [m, out] = rows [m, in] @ W.T with int8 activations, one row at a time, where `activation_mode`
        picks that path for these rows; None where it does not."""
        if self.int8_codes() is None:
            return None
        mode, kernel = activation_mode()
        if (mode == "int8" and rows.shape[0] != 1) or not self.int8_decodes(mode, kernel):
            return None
        call = self._int8_call([self], mode, kernel)
        if call is None:
            return None
        from runtime.kernels import uniform_int8_numba
        y = np.empty((rows.shape[0], self.shape[0]), dtype=np.float32)  # [m, out]
        for r, row in enumerate(rows):
            y[r] = uniform_int8_numba.run(call, row)
        return y

    def matmul_parts(self, parts, x):
        """[x @ W.T for W in parts] (this tensor first) in one int8-activation kernel call, for one row
        x [..., in] on the CPU; None where that does not apply (formats without the kernel, float
        activations, more rows, different grids, storage orders or tables): the caller multiplies one by one."""
        if is_cupy(x) or x.size != x.shape[-1]:
            return None
        product = self.one_row_product(parts)
        if product is None:
            return None
        self.check_input(x)
        ys = product(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))  # [out] each
        return [y.reshape(*x.shape[:-1], -1) for y in ys]

    def one_row_product(self, parts):
        """A function x [in] float32 -> [x @ W.T for W in parts] (this tensor first) through one prepared
        int8-activation kernel call under the current `activation_mode`, or None where `matmul_parts` would
        not apply: what the decode step keeps (runtime/linear.py `one_row_products`) so that its products
        choose their kernel once, not on every call."""
        return self._int8_product(parts)

    def separate_inputs_product(self, parts):
        """`one_row_product` for a different input per part: a function xs [len(parts), in] -> [xs[p] @ W.T
        for W in parts] in one kernel call (the incoherent format's transformed inputs), or None, as for
        every format with its own one-row product (SpQR, E8P, int8): where `prepared_call` is None."""
        return None if self.prepared_call(parts) is None else self._int8_product(parts)

    def prepared_call(self, parts):
        """The prepared int8-activation call (uniform_int8_numba.PreparedCall) that `one_row_product` runs for
        parts, where the product is that call alone, else None: what runtime/kernels/decode_layers_numba.py
        calls from Numba. Formats with their own one-row product give their own kernel's arguments (E8P,
        int8) or None (QuIP)."""
        if type(self).one_row_product is not PackedTensor.one_row_product:
            return None
        return self._int8_call(parts, *activation_mode())

    def _int8_product(self, parts):
        """The function of `one_row_product` (x [in] or [len(parts), in]), or None (`_int8_call`)."""
        call = self._int8_call(parts, *activation_mode())
        if call is None:
            return None
        from runtime.kernels import uniform_int8_numba
        ends = np.cumsum([0] + [p.shape[0] for p in parts]).tolist()
        bounds = list(zip(ends[:-1], ends[1:]))

        def product(x):
            y = uniform_int8_numba.run(call, x)  # [sum of outs]
            return [y[a:b] for a, b in bounds]
        return product

    def _int8_call(self, parts, mode: str, kernel: str):
        """The int8-activation kernel call (uniform_int8_numba.prepare) for parts (this tensor first) under
        `mode` and `kernel`, or None where that path does not apply; prepared on the first decode step and
        kept on this tensor (with the parts it was made for, so a key is never reused by other objects)."""
        calls = self.__dict__.setdefault("_int8_calls", {})
        key = (mode, kernel, *map(id, parts))
        if key in calls and all(a is b for a, b in zip(calls[key][0], parts)):
            return calls[key][1]
        call = None
        if all(isinstance(p, PackedTensor) and p.int8_decodes(mode, kernel) for p in parts):
            weights = [p.int8_weight() for p in parts]
            if all(w is not None for w in weights):
                from runtime.kernels import uniform_int8_numba
                call = uniform_int8_numba.prepare(weights, kernel)
        calls[key] = (tuple(parts), call)
        return call

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

    def check_stated(self, meta: dict, keys, hint: str = "") -> "PackedTensor":
        """This tensor, or UserError when the parameters its arrays give differ from the saved metadata's
        `keys` (the end of `from_tensors`); `hint` says how such a file may have come about."""
        stated = {k: meta[k] for k in keys}
        if self.meta() != stated:
            raise UserError(f"{self.FORMAT} tensor does not match its metadata: the arrays give {self.meta()}, "
                            f"the metadata says {stated}{hint}; re-quantize the model")
        return self

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
