"""The `sparse` format: a few float16 weights at arbitrary positions, in compressed sparse rows (CSR).

The storage of SpQR's unstructured outliers (Dettmers et al. 2023, "SpQR: A
Sparse-Quantized Representation for Near-Lossless LLM Weight Compression",
§4.2 "Sparse quantized representation": a 16-bit value and a 16-bit column
index per outlier, plus 32-bit row pointers). Every weight not listed is 0.

Arrays (nnz = number of stored weights, out / in = output / input features):

    values   float16 [nnz]      the weights, row by row, columns ascending within a row
    col_idx  uint16  [nnz]      the input column of each weight (so in <= 65536)
    row_ptr  int32   [out + 1]  row o holds entries row_ptr[o] .. row_ptr[o+1] - 1; row_ptr[0] = 0

    W[o, col_idx[k]] = values[k]    for row_ptr[o] <= k < row_ptr[o + 1]

Bits per weight, from the stored bytes: (32 nnz + 32 (out + 1)) / (out * in),
i.e. 32 bits per stored weight plus 32 / in per row.

`matmul` computes x @ W.T: with NumPy input the Numba CSR kernel
(runtime/kernels/sparse_numba.py), with CuPy input the CUDA one (sparse.cu,
launched by runtime/kernels/sparse_cuda.py). The kernels read the values as
float32 (`values32`, converted at the first product; not stored; SpQR's outliers never need it).
"""
from __future__ import annotations

import numpy as np

from runtime.device import array_module_of, is_cupy, to_module, to_numpy
from runtime.errors import UserError
from runtime.formats.base import PackedTensor

MAX_COLUMNS = 1 << 16  # col_idx is uint16


class SparseTensor(PackedTensor):
    """W [out, in] with only the listed weights non-zero (CSR layout above)."""

    FORMAT = "sparse"

    def __init__(self, values, col_idx, row_ptr, *, in_features: int):
        """Wrap CSR arrays (NumPy, or CuPy via `to_device`); UserError when they do not fit together."""
        self.values = values  # [nnz] float16
        self.col_idx = col_idx  # [nnz] uint16
        self.row_ptr = row_ptr  # [out + 1] int32
        self.in_features = int(in_features)
        self.out_features = int(row_ptr.shape[0]) - 1 if getattr(row_ptr, "ndim", 0) == 1 else -1
        self._check()
        self._values32 = None  # [nnz] float32, for the kernels: made on first use

    def values32(self):
        """The values as float32 [nnz], converted once."""
        if self._values32 is None:
            self._values32 = self.values.astype(array_module_of(self.values).float32)
        return self._values32

    @classmethod
    def from_entries(cls, rows, cols, values, shape: tuple[int, int]) -> "SparseTensor":
        """Pack weights values[k] (rounded to float16) at (rows[k], cols[k]) of a [out, in] weight; positions
        must be distinct."""
        n_out, n_in = shape
        rows = np.asarray(rows, dtype=np.int64)  # [nnz]
        cols = np.asarray(cols, dtype=np.int64)  # [nnz]
        if n_in > MAX_COLUMNS:
            raise UserError(f"sparse format: at most {MAX_COLUMNS} input columns (16-bit indices), got {n_in}")
        if rows.size and (rows.min() < 0 or rows.max() >= n_out or cols.min() < 0 or cols.max() >= n_in):
            raise UserError(f"sparse format: an entry lies outside the weight shape {list(shape)}")
        order = np.lexsort((cols, rows))  # [nnz] row-major order
        key = rows[order] * n_in + cols[order]  # [nnz] ascending
        if (np.diff(key) == 0).any():
            raise UserError("sparse format: two entries at the same position; give each position once")
        row_ptr = np.zeros(n_out + 1, dtype=np.int32)  # [out + 1]
        np.cumsum(np.bincount(rows, minlength=n_out), out=row_ptr[1:])
        return cls(np.asarray(values, dtype=np.float16)[order], cols[order].astype(np.uint16), row_ptr,
                   in_features=n_in)

    @property
    def qweight(self):
        """The stored weights (the base class checks devices on `qweight`)."""
        return self.values

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    def rows(self) -> np.ndarray:
        """The row of every stored weight, int64 [nnz] (NumPy)."""
        return np.repeat(np.arange(self.out_features), np.diff(to_numpy(self.row_ptr)))

    def _check(self):
        """Dtypes, shapes and (NumPy arrays) the CSR invariants."""
        expected = {"values": np.float16, "col_idx": np.uint16, "row_ptr": np.int32}
        for name, dtype in expected.items():
            a = getattr(self, name)
            if getattr(a, "ndim", 0) != 1 or a.dtype != dtype:
                raise UserError(f"sparse tensor {name} must be a 1-D {np.dtype(dtype).name} array, got "
                                f"{getattr(a, 'dtype', type(a).__name__)} {list(np.shape(a))}; re-quantize the model")
        if self.values.shape != self.col_idx.shape:
            raise UserError("sparse tensor values and col_idx differ in length; re-quantize the model")
        if not 0 < self.in_features <= MAX_COLUMNS:
            raise UserError(f"sparse tensor in_features must be in 1..{MAX_COLUMNS}, got {self.in_features}")
        if is_cupy(self.values):
            return
        ptr = self.row_ptr
        if ptr[0] != 0 or ptr[-1] != self.nnz or (np.diff(ptr) < 0).any():
            raise UserError("sparse tensor row_ptr must rise from 0 to the number of values; re-quantize the model")
        if self.nnz and int(self.col_idx.max()) >= self.in_features:
            raise UserError(f"sparse tensor has a column index past in_features={self.in_features}; "
                            f"re-quantize the model")
        if not np.isfinite(self.values).all():
            raise UserError("sparse tensor values are not all finite; re-quantize the model")

    def dequantize(self) -> np.ndarray:
        """W [out, in] float32: the stored weights, zeros elsewhere (the NumPy reference)."""
        w = np.zeros(self.shape, dtype=np.float32)  # [out, in]
        w[self.rows(), to_numpy(self.col_idx)] = to_numpy(self.values)
        return w

    def matmul_reference(self, x) -> np.ndarray:
        """y [..., out] = x [..., in] @ W.T through the NumPy reference."""
        return x @ self.dequantize().T

    def matmul_rows(self, x, on_gpu: bool):
        """y [m, out] = x [m, in] @ W.T: CUDA for CuPy input, Numba for NumPy input."""
        if on_gpu:
            import cupy

            from runtime.kernels import sparse_cuda
            y = cupy.zeros((x.shape[0], self.out_features), dtype=cupy.float32)  # [m, out]
            sparse_cuda.sparse_add(self.row_ptr, self.col_idx, self.values32(), x, y)
            return y
        from runtime.kernels import sparse_numba
        y = np.zeros((x.shape[0], self.out_features), dtype=np.float32)  # [m, out]
        sparse_numba.add_product(self.row_ptr, self.col_idx, self.values32(), x, y)
        return y

    def tensors(self) -> dict:
        return {"values": self.values, "col_idx": self.col_idx, "row_ptr": self.row_ptr}

    def meta(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict) -> "SparseTensor":
        names = {"values", "col_idx", "row_ptr"}
        if set(tensors) != names:
            raise UserError(f"packed tensor arrays {sorted(tensors)} do not match its metadata "
                            f"(format sparse needs {sorted(names)}); re-quantize the model")
        if type(meta.get("in_features")) is not int or type(meta.get("out_features")) is not int:
            raise UserError("sparse tensor metadata needs integer in_features and out_features; re-quantize the model")
        packed = cls(**tensors, in_features=meta["in_features"])
        if packed.out_features != meta["out_features"]:
            raise UserError(f"sparse tensor row_ptr gives {packed.out_features} rows, the metadata says "
                            f"{meta['out_features']}; re-quantize the model")
        return packed

    def to_device(self, xp) -> "SparseTensor":
        return SparseTensor(**{name: to_module(a, xp) for name, a in self.tensors().items()},
                            in_features=self.in_features)
