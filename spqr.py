"""SpQR: GPTQ with small groups, quantized statistics and float16 outliers, one linear layer at a time.

Follows Dettmers et al. 2023, "SpQR: A Sparse-Quantized Representation for
Near-Lossless LLM Weight Compression", §3.2-3.3 and Algorithm 1, and the
behaviour of its reference implementation (Vahe1994/SpQR, `SPQRUtil.quantize`,
`get_leave_one_out_error`). Produces the `spqr` format (runtime/formats/spqr.py).

The column loop is GPTQ's (gptq.py `obs_columns`: Optimal Brain Quantizer
updates with U, the upper Cholesky factor of H⁻¹, in lazy blocks, act-order
by descending H_jj); SpQR changes how a group's grid is fitted and how a
column is quantized (`SpQRGrids`):

1. Small groups (§3.2): a scale and zero per output row for every
   `group_size` (16) input columns, fitted min-max on the current weights.
2. Bilevel statistics (§3.2): those scales and zeros are quantized again,
   min-max to `stat_bits` (3) bits in blocks of `stat_group` (16)
   consecutive output rows, each block with a float16 step and low
   (runtime.formats.spqr.quantize_stats); the zero is not rounded to an
   integer first (reference: round_zero=False). stat_bits = 16 keeps them
   in float16 with GPTQ's grid (`find_grid`: float16 scale, integer zero),
   so with no outliers SpQR gives exactly GPTQ's codes.
3. Outliers (§3.3, Algorithm 1). The threshold of a weight's rows is
   τ · mean_j( Var_rows(W[:, j]) / U_jj² )  (reference: `outlier_scale`,
   τ = `outlier_threshold`). At a group start, each weight's leave-one-out
   gain — the drop of the group row's error Σ_k ((w_k − q(w_k)) / U_kk)²
   when the grid is fitted without that weight and the weight is kept
   exact — marks likely outliers, which are replaced by the row's mean of
   the others before the grid is fitted (so they do not stretch it). Then
   each column j is quantized and every weight with
   ((w − q(w)) / U_jj)² > threshold becomes an outlier: it is kept as
   float16, its error (w − fp16(w)) / U_jj is spread like any other, and its
   dense code is the one nearest 0 (the format replaces it).

stats: layerwise.layer_stats ("loss" of the packed weight, "rtn_loss" of
round-to-nearest with the same group size: GPTQ's grid per group, no error
feedback, "ratio" their quotient), plus "outliers", the outlier count, and
"bits", the stored bits per weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import gptq
from layerwise import check_problem, damping, layer_stats, undamped_losses
from runtime.errors import UserError
from runtime.formats.sparse import MAX_COLUMNS, SparseTensor
from runtime.formats.spqr import FP16_STATS, SpQRTensor, check_params, dequantize_stats, quantize_stats
from runtime.kernels.leave_one_out_numba import minmax_leave_one_out_gain
from runtime.quant_grid import dequantize_grid, find_grid, quantize_to_grid
from runtime.method_contract import MethodContract, Option, QuantSpec


@dataclass
class SpQRParams:
    bits: int = 3  # base code bits: 2, 3 or 4
    group_size: int = 16  # input columns per first-level scale and zero (a multiple of 16)
    outlier_threshold: float = 0.2  # τ, relative to the layer's mean Var(W[:, j]) / U_jj²; math.inf: no outliers
    stat_bits: int = 3  # bits of the quantized scales and zeros; 16: float16, not quantized
    stat_group: int = 16  # consecutive output rows sharing one second-level step and low
    act_order: bool = True  # quantize columns by descending H_jj
    percdamp: float = 0.01  # dampening, as a fraction of mean(diag H)
    blocksize: int = 128  # columns per lazy batch update

    def check(self) -> None:
        """UserError unless every parameter is in range."""
        check_params(self.bits, self.group_size, self.stat_bits, self.stat_group)
        if not self.outlier_threshold > 0:
            raise UserError(f"spqr: outlier_threshold must be > 0 (math.inf: no outliers), "
                            f"got {self.outlier_threshold}")
        if not (math.isfinite(self.percdamp) and self.percdamp >= 0):
            raise UserError(f"spqr: percdamp must be a finite number >= 0, got {self.percdamp}")
        if self.blocksize < 1:
            raise UserError(f"spqr: blocksize must be a positive number of columns, got {self.blocksize}")


def from_tag(spec: QuantSpec) -> SpQRParams:
    """The parameters a tag asks for: tN sets tau to N/100, dense to infinity, sN the statistic bits."""
    if "t" in spec.values and ("dense" in spec.options or spec.values["t"] == 0):
        raise UserError(f"tag {spec.tag!r}: give either a positive outlier threshold tN or 'dense' (no outliers)")
    threshold = spec.values["t"] / 100 if "t" in spec.values else SpQRParams.outlier_threshold
    return SpQRParams(bits=spec.bits, group_size=spec.group_size or SpQRParams.group_size,
                      outlier_threshold=math.inf if "dense" in spec.options else threshold,
                      stat_bits=spec.values.get("s", SpQRParams.stat_bits))


def leave_one_out_gain(w: np.ndarray, hinv_diag: np.ndarray, fit: "RowGridFit") -> np.ndarray:
    """[rows, n]: how much Σ_k ((w_k − q(w_k)) / U_kk)² of each row of w [rows, n] drops when weight k is
    left out of the grid fit and kept exact (reference: `get_leave_one_out_error`); hinv_diag [n]: U_kk.
    For any grid fit; the min-max grid of quantized statistics takes runtime/kernels/leave_one_out_numba.py."""
    rows, n = w.shape
    others = np.array([[i for i in range(n) if i != k] for k in range(n)])  # [n, n - 1]

    def error(values, u):  # values [r, m], u [r or 1, m] -> [r]: Σ ((v - q(v)) / u)² on the grid fitted to v
        scale, zero = fit(values)  # [r] each
        codes = np.clip(np.rint(values / scale[:, None] + zero[:, None]), 0, fit.maxq)  # [r, m]
        return np.sum((((codes - zero[:, None]) * scale[:, None] - values) / u) ** 2, axis=1)

    baseline = error(w, hinv_diag[None])  # [rows]
    loo = w[:, others].reshape(rows * n, n - 1)  # [rows * n, n - 1] row o without weight k
    loo_error = error(loo, np.tile(hinv_diag[others], (rows, 1))).reshape(rows, n)  # [rows, n]
    return baseline[:, None] - loo_error


class RowGridFit:
    """One grid per row of a block of weights: GPTQ's `find_grid` (float16 scale, integer zero) for
    float16 statistics, else the plain min-max grid with an unrounded zero (reference: round_zero=False)."""

    def __init__(self, bits: int, stat_bits: int):
        self.bits, self.stat_bits = bits, stat_bits
        self.maxq = (1 << bits) - 1

    def __call__(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scale float32 [rows] > 0, zero float32 [rows]) for w [rows, n]."""
        if self.stat_bits == FP16_STATS:
            scale, zero = find_grid(w, self.bits, sym=False)
            return scale, zero.astype(np.float32)
        lo = np.minimum(w.min(axis=1), 0)  # [rows]
        hi = np.maximum(w.max(axis=1), 0)  # [rows]
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise UserError("the weights contain NaN or infinity; check the checkpoint before quantizing")
        scale = ((hi - lo) / self.maxq).astype(np.float32)  # [rows]
        scale[scale == 0] = 1  # an all-zero row: any scale decodes it (SpQRGrids.fit tightens it)
        return scale, (-lo / scale).astype(np.float32)


class SpQRGrids:
    """The grids of Algorithm 1 for SpQR (the interface of gptq.GroupGrids): outlier-aware group fits with
    bilevel statistics, and column quantization that keeps outliers (module docstring, steps 1-3)."""

    def __init__(self, params: SpQRParams, n_groups: int, shape: tuple[int, int], segments: list,
                 thresholds: np.ndarray):
        """segments: the row slices of the stacked weights (statistics blocks never cross one);
        thresholds [out]: the outlier threshold of each row (inf: no outliers)."""
        n_out, n_in = shape
        self.params, self.segments, self.thresholds = params, segments, thresholds
        self.fit_rows = RowGridFit(params.bits, params.stat_bits)
        self.find_outliers = bool(np.isfinite(thresholds).any())
        self.scales = np.empty((n_groups, n_out), dtype=np.float32)  # [n_groups, out] decoded
        self.zeros = np.empty((n_groups, n_out), dtype=np.float32)  # [n_groups, out] decoded
        self.stat_codes = {"scale": [], "zero": []}  # per group: [(codes, step, low) per segment]
        self.outlier_mask = np.zeros((n_out, n_in), dtype=bool)  # [out, in] permuted positions

    def fit(self, g: int, weights: np.ndarray, hinv_diag: np.ndarray) -> None:
        """Group g's grids from its weights [out, width] as they are now, likely outliers left out."""
        w = weights.astype(np.float32)  # [out, width]
        if self.find_outliers:
            gain = (leave_one_out_gain(w, hinv_diag, self.fit_rows) if self.params.stat_bits == FP16_STATS
                    else minmax_leave_one_out_gain(w, hinv_diag.astype(np.float32), self.fit_rows.maxq))
            likely = gain > self.thresholds[:, None]  # [out, width]
            kept = np.sum(~likely, axis=1)  # [out]
            mean = np.sum(np.where(likely, 0, w), axis=1) / np.maximum(kept, 1)  # [out]
            w = np.where(likely, mean[:, None], w)  # [out, width]
        scale, zero = self.fit_rows(w)  # [out] each
        if self.params.stat_bits != FP16_STATS:
            for rows in self.segments:  # an all-zero row takes its weight's smallest scale: its block stays tight
                zero_rows = np.all(w[rows] == 0, axis=1)  # [out_k]
                if zero_rows.any() and not zero_rows.all():
                    scale[rows][zero_rows] = scale[rows][~zero_rows].min()
            for name, values in (("scale", scale), ("zero", zero)):
                parts = [quantize_stats(values[rows], self.params.stat_bits, self.params.stat_group)
                         for rows in self.segments]
                self.stat_codes[name].append(parts)
                values[:] = np.concatenate([dequantize_stats(*part, self.params.stat_group) for part in parts])
        self.scales[g], self.zeros[g] = scale, zero

    def kernel_grid(self) -> tuple:
        """(scales, zeros [n_groups, out] float32, maxq, GPTQ's rounding (float16 statistics) or the unrounded
        zero's, outlier thresholds [out] (empty: none), outlier mask [out, in]) as gptq.obs_columns'
        `round_columns` takes them: each column's codes, and its outliers kept as float16 weights."""
        thresholds = self.thresholds if self.find_outliers else gptq.NO_THRESHOLDS
        return (self.scales, self.zeros, self.fit_rows.maxq, self.params.stat_bits == FP16_STATS, thresholds,
                self.outlier_mask)

    def statistics(self, k: int):
        """(scales, zeros) of segment k as `SpQRTensor.from_codes` takes them."""
        rows = self.segments[k]
        if self.params.stat_bits == FP16_STATS:
            return self.scales[:, rows], self.zeros[:, rows]
        stacked = []
        for name in ("scale", "zero"):
            per_group = [group[k] for group in self.stat_codes[name]]  # (codes, step, low) of each group
            stacked.append(tuple(np.stack(arrays) for arrays in zip(*per_group)))  # [n_groups, ...] each
        return stacked[0], stacked[1]


def rtn_dequantized(W: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """W [out, in] rounded to nearest on GPTQ's grid per group of `group_size` columns (the RTN baseline)."""
    Q = np.empty_like(W)  # [out, in]
    for c in range(0, W.shape[1], group_size):
        block = W[:, c:c + group_size]  # [out, width]
        scale, zero = find_grid(block, bits, sym=False)
        Q[:, c:c + group_size] = dequantize_grid(quantize_to_grid(block, scale, zero, bits), scale, zero)
    return Q


def quantize(W: np.ndarray, H: np.ndarray, params: SpQRParams = SpQRParams()) -> tuple[SpQRTensor, dict]:
    """W [out, in], H [in, in] -> (SpQRTensor, stats) (stats: see the module docstring)."""
    return quantize_shared([W], H, params)[0]


def quantize_shared(weights: list, H: np.ndarray, params: SpQRParams = SpQRParams()) -> list:
    """`quantize` for several weights [out_k, in] that read the same input (one H): [(packed, stats)].

    Rows never interact in Algorithm 1, so the weights are stacked and quantized in one pass; thresholds
    and statistics blocks are per weight, so each result equals `quantize` of that weight alone (to the
    BLAS's rounding: see gptq.quantize_shared).
    """
    params.check()
    weights = [np.asarray(W, dtype=np.float32) for W in weights]  # [out_k, in] each
    if any(W.ndim != 2 for W in weights):
        raise UserError(f"the weights must be 2-D arrays [out, in], got shapes {[list(W.shape) for W in weights]}")
    W, H = check_problem(np.concatenate(weights), H)  # [out, in], [in, in]
    n_out, n_in = W.shape
    if n_in > MAX_COLUMNS:
        raise UserError(f"spqr: at most {MAX_COLUMNS} input columns (16-bit outlier indices), got {n_in}")
    starts = np.cumsum([0] + [w.shape[0] for w in weights])
    segments = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]

    W0, perm, U = gptq.prepare(W, H, params.act_order, params.percdamp)
    Wp = np.take(W0, perm, axis=1)  # [out, in] permuted columns, rows contiguous (W0[:, perm]: column-major)
    thresholds = np.full(n_out, math.inf)  # [out]
    if math.isfinite(params.outlier_threshold):
        hinv_sq = np.diag(U) ** 2  # [in]
        for rows in segments:
            thresholds[rows] = params.outlier_threshold * np.mean(np.var(Wp[rows], axis=0) / hinv_sq)
    n_groups = -(-n_in // params.group_size)
    grids = SpQRGrids(params, n_groups, (n_out, n_in), segments, thresholds)
    codes, Q, _, err_sq = gptq.obs_columns(Wp, U, grids, params.group_size, params.blocksize)

    inverse = np.argsort(perm)  # [in]
    codes, Q, outlier_mask = (np.take(a, inverse, axis=1) for a in (codes, Q, grids.outlier_mask))  # [out, in]
    #                                              each (a[:, inverse] gathers 8x slower: 0.45 s at OPT-1.3b's fc2)
    lam = damping(H, params.percdamp)
    results = []
    for k, (Wk, rows) in enumerate(zip(weights, segments)):
        o_rows, o_cols = np.nonzero(outlier_mask[rows])  # [nnz] each
        outliers = SparseTensor.from_entries(o_rows, o_cols, Q[rows][o_rows, o_cols], Wk.shape)
        scales, zeros = grids.statistics(k)
        packed = SpQRTensor.from_codes(codes[rows], perm, scales, zeros, outliers, bits=params.bits,
                                       group_size=params.group_size, stat_bits=params.stat_bits,
                                       stat_group=params.stat_group)
        loss = undamped_losses(err_sq[rows], W0[rows], Q[rows], H, lam)  # [out_k] the loop's own (gptq.py)
        stats = layer_stats(Wk, rtn_dequantized(Wk, params.bits, params.group_size), H,
                            loss=float(loss.sum()))
        results.append((packed, {**stats, "outliers": outliers.nnz, "bits": packed.bits_per_weight}))
    return results


CONTRACTS = (MethodContract(
    "spqr", "SpQR: small groups, quantized statistics, float16 outliers", bits=(2, 3, 4), params=from_tag,
    quantize=quantize_shared, examples=("spqr3", "spqr4g16s3t20", "spqr3dense"),
    options=(Option("s", "--stat-bits", "bits of the quantized group statistics (16 keeps them in float16)",
                    field="stat_bits", scale=1),
             Option("t", "--outlier-threshold", "outlier sensitivity threshold tau, in steps of 0.01",
                    field="outlier_threshold", scale=100),
             Option("dense", "--no-outliers", "keep no outliers (tau = infinity)")),
    group_multiple=16, group_field="group_size", calibration="hessian"),)
