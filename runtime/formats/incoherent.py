"""The `incoherent` format: another packed weight behind seeded random orthogonal transforms (QuIP).

The storage of QuIP weights (Chee, Cai, Kuleshov, De Sa 2023, "QuIP: 2-Bit
Quantization of Large Language Models With Guarantees", §4 incoherence
processing, Algorithms 1-2, and the supplement's Kronecker-factored
orthogonal matrices). The quantizer (quip.py) rescales the input columns of
W [out, in] by a diagonal D, turns it into U (W D) Vᵀ with random orthogonal
U [out, out] and V [in, in], and stores that processed weight Ŵ in an inner
format. The weight this tensor stands for is

    W = Uᵀ Ŵ V D⁻¹        so   y = x Wᵀ = ((x D⁻¹) Vᵀ) Ŵᵀ U

and `matmul_rows` runs exactly that: scale x, apply V, the inner product,
apply Uᵀ; W itself is never formed.

The orthogonal matrices. Each is M = P_post (A ⊗ B) P_pre for a size
n = a·b, a the largest divisor of n with a <= √n (a = 1 for a prime n): A
[a, a] and B [b, b] Haar-random orthogonal factors (QR of a Gaussian matrix,
columns' signs fixed so R has a positive diagonal), P_pre and P_post random
permutations. On a vector v, M v is: gather v[perm_pre], reshape to X [a, b],
X -> A X Bᵀ, flatten, gather [perm_post] (two small matmuls, O(n (a + b))).
They are NOT stored: both are drawn again from the seed in the metadata,
through NumPy's PCG64 bit generator (whose raw 64-bit stream is stable
across NumPy versions) and code in this file: Box-Muller normals, argsort of
raw words for permutations. V is drawn from (seed, 0, in), U from (seed, 1, out).

Midrise grids. QuIP's grid (§4, Algorithm 1 steps 6-7: s = ρ‖W‖_F/√(mn),
codes of ½(W/s + 1)(2^b - 1)) has levels s(2q/(2^b - 1) - 1), symmetric
around 0 without a level at 0. With `midrise` the inner tensor must be a
`uniform` tensor with one group per row and a symmetric grid (zero 2^(b-1)),
and every level is shifted up by half a step:

    Ŵ[o, i] = inner.dequantize()[o, i] + scale[o] / 2

(so (q - 2^(b-1) + ½)·scale, with scale = 2s/(2^b - 1)); the product adds
sum(x Vᵀ) · scale / 2 to each output.

Arrays (prefix `inner.` for the inner tensor's own arrays, as its format
names them):

    rescale        float16 [in]   the diagonal D (1 where not rescaled)
    inner.<part>   ...            the inner format's arrays for Ŵ [out, in]

Bits per weight, from the stored bytes: the inner format's, plus 16 / out
for `rescale` (e.g. 2 + 0.087 + 0.028 = 2.115 for a 2-bit per-tensor uniform
inner tensor of shape [576, 576]); the transforms cost no storage.
"""
from __future__ import annotations

import math

import numpy as np

from runtime.device import array_module_of, is_cupy, to_module, to_numpy
from runtime.errors import UserError
from runtime.formats import format_class
from runtime.formats.base import PackedTensor

SIDE_IN, SIDE_OUT = 0, 1  # the stream tags of V (input side) and U (output side)
SPLIT_FLOATS = 1 << 18  # `apply`'s 2-D NumPy inputs of at least this many floats (a whole weight or Hessian
#                        in quantization and `dequantize`) take the Numba row kernel
NONE = np.zeros(0, dtype=np.float32)  # an absent scale or shift of the CPU transform kernels
NONE.flags.writeable = False


def kron_sizes(n: int) -> tuple[int, int]:
    """(a, b) with a * b = n and a the largest divisor of n not above √n."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def _raw_stream(seed: int, side: int, n: int):
    """The PCG64 bit generator of the transform of size n on `side`, for this seed."""
    return np.random.PCG64(np.random.SeedSequence([seed, side, n]))


def _normals(stream, count: int) -> np.ndarray:
    """float64 [count] standard normals from raw 64-bit words (Box-Muller; 2 words per normal)."""
    words = stream.random_raw(2 * count).reshape(2, count)  # [2, count] uint64
    u1 = ((words[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # [count] in (0, 1]
    u2 = (words[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [count] in [0, 1)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


def _haar_orthogonal(stream, k: int) -> np.ndarray:
    """float64 [k, k] Haar-random orthogonal matrix: Q of the QR of a Gaussian, signs fixed by diag(R) > 0."""
    q, r = np.linalg.qr(_normals(stream, k * k).reshape(k, k))  # [k, k], [k, k]
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)  # [k]
    return q * signs


def _permutation(stream, n: int) -> np.ndarray:
    """int64 [n] random permutation: the stable argsort of n raw 64-bit words."""
    return np.argsort(stream.random_raw(n), kind="stable")


class KronOrthogonal:
    """M = P_post (A ⊗ B) P_pre [n, n], orthogonal, applied along the last axis of row vectors."""

    def __init__(self, factor_a, factor_b, perm_pre, perm_post):
        self.factor_a = factor_a  # [a, a] float32
        self.factor_b = factor_b  # [b, b] float32
        self.perm_pre = perm_pre  # [n] int64
        self.perm_post = perm_post  # [n] int64
        xp = array_module_of(perm_pre)
        self.inv_pre = xp.argsort(perm_pre)  # [n]
        self.inv_post = xp.argsort(perm_post)  # [n]

    @classmethod
    def random(cls, n: int, seed: int, side: int) -> "KronOrthogonal":
        """The seeded transform of size n for `side` (SIDE_IN: V, SIDE_OUT: U); NumPy arrays."""
        stream = _raw_stream(seed, side, n)
        a, b = kron_sizes(n)
        factor_a = _haar_orthogonal(stream, a).astype(np.float32)  # [a, a]
        factor_b = _haar_orthogonal(stream, b).astype(np.float32)  # [b, b]
        return cls(factor_a, factor_b, _permutation(stream, n), _permutation(stream, n))

    @property
    def size(self) -> int:
        return int(self.perm_pre.shape[0])

    def apply(self, x, transpose: bool = False):
        """Rows of x [..., n] as vectors v: M v (or Mᵀ v with `transpose`), float32, same array module. NumPy rows
        of at least SPLIT_FLOATS values take the Numba row kernel (runtime/kernels/incoherent_numba.py, rows
        over the threads; BLAS runs on one thread in this runtime, and the small batched products here ran at
        a third of its speed on a whole 8192 x 8192 Hessian)."""
        if isinstance(x, np.ndarray) and x.ndim == 2 and x.size >= SPLIT_FLOATS:
            from runtime.kernels.incoherent_numba import row_transform, transform
            rows = np.ascontiguousarray(x, dtype=np.float32)  # [m, n]
            return transform(rows, row_transform(self.kernel_factors(transpose)), NONE.reshape(len(rows), 0))
        return self._mixed(x, *self._factors(transpose))

    def apply_to_columns(self, x: np.ndarray, transpose: bool = False) -> np.ndarray:
        """M x (or Mᵀ x) [n, m] float32 for NumPy x [n, m]: its columns as vectors. The row gathers and both
        factors each act on the whole matrix (one product by the first factor over all columns, one by the
        second per block of rows), so no transpose of x is made: with `apply` on rows, the two sides of
        quip.py's V H Vᵀ on an 8192 x 8192 Hessian took 0.6 s where two calls of `apply` with a transpose
        between them took 2.4."""
        first, left, right, last = self._factors(transpose)
        n, a = self.size, left.shape[0]
        blocks = np.take(np.asarray(x, dtype=np.float32), first, axis=0).reshape(a, -1)  # [a, b m]  X by rows
        mixed = (left @ blocks).reshape(a, n // a, -1)  # [a, b, m]  L X
        mixed = right.T @ mixed  # [a, b, m]  (L X R) per column: R's transpose on each block of rows
        return np.take(mixed.reshape(n, -1), last, axis=0)  # [n, m]

    def _factors(self, transpose: bool) -> tuple:
        """(first, left, right, last) of M (or Mᵀ): M v = gather `last` of left X right, X = v gathered by `first`
        and reshaped [a, b]; arrays of this transform's module."""
        if transpose:
            return self.inv_post, self.factor_a.T, self.factor_b, self.inv_pre
        return self.perm_pre, self.factor_a, self.factor_b.T, self.perm_post

    def _mixed(self, x, first, left, right, last, out=None):
        """M v for the rows v of x [..., n] given `_factors` (out: where to write, NumPy only)."""
        xp = array_module_of(x)
        lead = x.shape[:-1]
        blocks = xp.take(x, first, axis=-1).reshape(*lead, left.shape[0], right.shape[0])  # [..., a, b]
        mixed = (left @ blocks @ right).reshape(*lead, -1)  # [..., n]
        return xp.take(mixed, last, axis=-1) if out is None else np.take(mixed, last, axis=-1, out=out)

    def kernel_factors(self, transpose: bool = False) -> tuple:
        """(first, left, right, last) of M (or Mᵀ with `transpose`) as runtime/kernels/incoherent_numba.py
        takes them (NumPy arrays, the factors C-contiguous): `_factors`."""
        first, left, right, last = self._factors(transpose)
        return (to_numpy(first), np.ascontiguousarray(to_numpy(left)), np.ascontiguousarray(to_numpy(right)),
                to_numpy(last))

    def to_device(self, xp) -> "KronOrthogonal":
        """A copy whose arrays live in array module xp."""
        return KronOrthogonal(*(to_module(a, xp) for a in (self.factor_a, self.factor_b, self.perm_pre,
                                                           self.perm_post)))


def transforms(shape: tuple[int, int], seed: int) -> tuple[KronOrthogonal, KronOrthogonal]:
    """(U on the output side [out, out], V on the input side [in, in]) of a weight [out, in]."""
    n_out, n_in = shape
    return KronOrthogonal.random(n_out, seed, SIDE_OUT), KronOrthogonal.random(n_in, seed, SIDE_IN)


class IncoherentTensor(PackedTensor):
    """W [out, in] = Uᵀ Ŵ V D⁻¹ with Ŵ an inner packed tensor and U, V drawn from a seed (layout above)."""

    FORMAT = "incoherent"
    CUDA_GRAPH = False  # U and V multiply through cuBLAS (KronOrthogonal.apply), which a CUDA graph cannot capture

    def __init__(self, inner: PackedTensor, rescale, *, seed: int, midrise: bool):
        """Wrap `inner` (Ŵ, NumPy or CuPy arrays) with D = rescale [in] float16; UserError when they do not fit."""
        self.inner = inner
        self.qweight = inner.qweight  # the codes (device checks of PackedTensor)
        self.rescale = rescale  # [in] float16
        self.seed = int(seed)
        self.midrise = bool(midrise)
        self._check()
        xp = array_module_of(inner.qweight)
        transform_out, transform_in = transforms(inner.shape, self.seed)
        self.transform_out = transform_out.to_device(xp)  # U
        self.transform_in = transform_in.to_device(xp)  # V
        self.inv_rescale = (1.0 / rescale.astype(xp.float32)).astype(xp.float32)  # [in]
        self.half_step = None  # [out] float32 midrise shift, None without one
        self._transforms = None  # the CPU kernels' layout of U and V (`_kernel_transforms`)
        if self.midrise:
            self.half_step = (inner.scales[0].astype(xp.float32) * 0.5).astype(xp.float32)

    def _check(self):
        def fail(what):
            raise UserError(f"incoherent tensor: {what}; re-quantize the weight")

        if not isinstance(self.inner, PackedTensor) or isinstance(self.inner, IncoherentTensor):
            fail("the inner tensor must be a packed tensor of another format")
        n_in = self.inner.shape[1]
        if self.rescale.dtype != np.float16 or tuple(self.rescale.shape) != (n_in,):
            fail(f"rescale must be float16 [{n_in}], got {self.rescale.dtype} {list(self.rescale.shape)}")
        if not is_cupy(self.rescale) and not (np.isfinite(self.rescale).all() and (self.rescale > 0).all()):
            fail("rescale must be finite and positive")
        if self.midrise and not (self.inner.FORMAT == "uniform" and self.inner.group_size == -1
                                 and self.inner.sym):
            fail("a midrise grid needs a symmetric uniform inner tensor with one group per row")

    @property
    def shape(self) -> tuple[int, int]:
        return self.inner.shape

    def processed(self) -> np.ndarray:
        """Ŵ [out, in] float32: the inner weight with the midrise shift (NumPy)."""
        w = self.inner.dequantize()  # [out, in]
        if is_cupy(w):
            w = w.get()
        if self.midrise:
            half = to_numpy(self.half_step)
            w = w + half[:, None]
        return np.asarray(w, dtype=np.float32)

    def dequantize(self):
        """W [out, in] float32 = Uᵀ Ŵ V D⁻¹ (the NumPy reference)."""
        transform_out = self.transform_out.to_device(np)
        transform_in = self.transform_in.to_device(np)
        w = transform_in.apply(self.processed(), transpose=True)  # [out, in]  Ŵ V (rows: Vᵀ r)
        w = transform_out.apply_to_columns(w, transpose=True)  # [out, in]  Uᵀ Ŵ V
        rescale = to_numpy(self.rescale)
        return np.ascontiguousarray(w / rescale.astype(np.float32), dtype=np.float32)

    def matmul_reference(self, x) -> np.ndarray:
        """y [..., out] = x [..., in] @ W.T through the NumPy reference `dequantize`."""
        return np.asarray(x, dtype=np.float32) @ self.dequantize().T

    def matmul_reference_int8(self, x) -> np.ndarray:
        """y [m, out] for x [m, in], the reference of the int8-activation path: `matmul_rows` with the inner
        product replaced by the inner format's int8 reference (its activation quantization)."""
        return self._around_inner(np.asarray(x, dtype=np.float32), self.inner.matmul_reference_int8, kernels=False)

    def matmul_rows(self, x, on_gpu: bool):
        """y [m, out] = x [m, in] @ W.T: transform x, the inner product (its own kernels: one row on the CPU
        takes the inner format's int8 decode kernel), transform back."""
        return self._around_inner(x, self.inner.matmul)

    def _kernel_transforms(self) -> tuple:
        """(V on x with D⁻¹, Uᵀ on the product with the midrise half step) as
        runtime/kernels/incoherent_numba.py's RowTransforms; laid out once."""
        if self._transforms is None:
            from runtime.kernels.incoherent_numba import row_transform
            half_step = None if self.half_step is None else to_numpy(self.half_step)
            self._transforms = (row_transform(self.transform_in.kernel_factors(), scale=to_numpy(self.inv_rescale)),
                                row_transform(self.transform_out.kernel_factors(transpose=True), add=half_step))
        return self._transforms

    def one_row_product(self, parts):
        """PackedTensor.one_row_product for incoherent parts on the CPU: per part, V on x D⁻¹ and Uᵀ on the
        product (Numba, this thread) around the inner tensors' products: one int8 kernel call for all parts
        where their format takes a different input per part (`separate_inputs_product`: one parallel region
        where there were one per part), else each inner tensor's own one-row product."""
        if not all(isinstance(p, IncoherentTensor) and not is_cupy(p.qweight) for p in parts):
            return None
        from runtime.kernels.incoherent_numba import transform
        transforms = [part._kernel_transforms() for part in parts]
        inners = [part.inner for part in parts]
        fused = inners[0].separate_inputs_product(inners)
        if fused is not None:
            def product(x):
                x_ins = np.stack([transform(x, into, NONE) for into, _ in transforms])  # [parts, in]
                return [transform(y, back, x_in) for y, x_in, (_, back) in zip(fused(x_ins), x_ins, transforms)]
            return product
        steps = [(inner.one_row_product([inner]) or (lambda v, w=inner: [w.matmul(v)]), *pair)
                 for inner, pair in zip(inners, transforms)]

        def one_by_one(x):
            ys = []
            for inner, into, back in steps:
                x_in = transform(x, into, NONE)  # [in]
                ys.append(transform(inner(x_in)[0], back, x_in))  # [out], the half step times sum(x_in)
            return ys
        return one_by_one

    def prepared_call(self, parts):
        """PackedTensor.prepared_call for incoherent parts on the CPU: their transforms and the inner tensors'
        prepared call (incoherent_numba.TransformedCall), where `one_row_product` runs them as one int8 call
        with an input per part, else None."""
        if not all(isinstance(p, IncoherentTensor) and not is_cupy(p.qweight) for p in parts):
            return None
        from runtime.kernels.incoherent_numba import TransformedCall
        from runtime.kernels.uniform_int8_numba import PreparedCall
        inners = [part.inner for part in parts]
        inner = inners[0].prepared_call(inners)  # a PreparedCall exactly where `separate_inputs_product` is not None
        if not isinstance(inner, PreparedCall):
            return None
        return TransformedCall(inner, tuple(p._kernel_transforms() for p in parts))

    def _around_inner(self, x, inner_product, kernels: bool = True):
        """Transform x [m, in] (rescale, V), multiply by Ŵ with inner_product, add the midrise half step,
        transform back (Uᵀ): y [m, out] float32. With `kernels`, NumPy rows take the Numba transforms (rows
        over the threads); else `KronOrthogonal.apply` (the NumPy reference, and CuPy)."""
        xp = array_module_of(x)
        if kernels and xp is np:
            from runtime.kernels.incoherent_numba import transform
            into, back = self._kernel_transforms()
            x_in = transform(np.ascontiguousarray(x, dtype=np.float32), into, NONE.reshape(len(x), 0))  # [m, in]
            return transform(np.ascontiguousarray(inner_product(x_in), dtype=np.float32), back, x_in)  # [m, out]
        x_in = xp.ascontiguousarray(self.transform_in.apply(x * self.inv_rescale), dtype=xp.float32)  # [m, in]
        y = inner_product(x_in)  # [m, out]
        if self.midrise:
            y = y + x_in.sum(axis=1, keepdims=True) * self.half_step  # [m, out]
        return xp.ascontiguousarray(self.transform_out.apply(y, transpose=True), dtype=xp.float32)  # [m, out]

    def tensors(self) -> dict:
        arrays = {"rescale": self.rescale}
        arrays.update({f"inner.{part}": a for part, a in self.inner.tensors().items()})
        return arrays

    def meta(self) -> dict:
        return {"shape": list(self.shape), "seed": self.seed, "midrise": self.midrise,
                "inner_format": self.inner.FORMAT, "inner": self.inner.meta()}

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict) -> "IncoherentTensor":
        cls.require_meta(meta, ("shape", "seed", "midrise", "inner_format", "inner"))
        if type(meta["seed"]) is not int or type(meta["midrise"]) is not bool:
            raise UserError("incoherent tensor metadata: seed must be an integer and midrise a boolean; "
                            "re-quantize the model")
        if "rescale" not in tensors:
            raise UserError("incoherent tensor: the array `rescale` is missing; re-quantize the model")
        inner_parts = {k[len("inner."):]: a for k, a in tensors.items() if k.startswith("inner.")}
        extra = set(tensors) - {"rescale"} - {f"inner.{k}" for k in inner_parts}
        if extra:
            raise UserError(f"incoherent tensor: unexpected arrays {sorted(extra)}; re-quantize the model")
        inner = format_class(meta["inner_format"]).from_tensors(inner_parts, meta["inner"])
        packed = cls(inner, tensors["rescale"], seed=meta["seed"], midrise=meta["midrise"])
        if list(packed.shape) != list(meta["shape"]):
            raise UserError(f"incoherent tensor: metadata shape {meta['shape']} does not match the arrays' "
                            f"{list(packed.shape)}; re-quantize the model")
        return packed

    def to_device(self, xp) -> "IncoherentTensor":
        return IncoherentTensor(self.inner.to_device(xp), to_module(self.rescale, xp), seed=self.seed,
                                midrise=self.midrise)
