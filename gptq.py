"""GPTQ: second-order weight quantization onto the uniform grid, one linear layer at a time.

Follows Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", §4 (Algorithm 1), and the behaviour of
its reference implementation (IST-DASLab/gptq, `GPTQ.fasterquant`).

Given a weight W [out, in] and the Hessian of the layer-wise loss
H = 2/n · Σ x xᵀ [in, in] of its calibration inputs, GPTQ quantizes the
columns of W one after the other and, after each, spreads the column's
rounding error over the columns not yet quantized (Optimal Brain Quantizer
update, §3-4), so that the proxy loss tr((W − Q) H (W − Q)ᵀ) stays small:

    dead columns (H_jj = 0): H_jj = 1, W[:, j] = 0    (no input ever reaches them)
    act-order (reference option --act-order): columns by descending H_jj
    H += percdamp · mean(diag H) · I                  (dampening, §4 Step 3)
    U = upper Cholesky factor of H⁻¹                   (§4 Step 3: Cholesky reformulation)
    for each block of `blocksize` columns (lazy batch updates, §4 Step 2):
        for column j of the block:
            at a group start: fit the group's grid on the current (updated) weights
            q_j = quantize(w_j);  e = (w_j − q_j) / U_jj
            W[:, j:block end] −= e · U[j, j:block end]
        W[:, block end:] −= E · U[block, block end:]   (E: the block's errors)

A group's grid is fitted when its first column comes up, on the weights
with every update so far (the reference fits a group that starts inside a
block on the block-start weights; the two agree when every group starts a
block, e.g. G = blocksize = 128). `static_groups` fits every group's grid
up front on the original W (reference option --static-groups); groups then
stay the column groups j // G even with act-order. Without it and with
act-order, column perm[i] lands in group i // G, which the uniform format
stores as its g_idx.

Grids come from `runtime.quant_grid` (the same range rule as rtn.py), so
with H = I (no error to spread) GPTQ gives exactly the RTN codes. The loop
(`obs_columns`) reaches them through a grids object with two methods, `fit`
(a group's grid) and `kernel_grid` (the arrays and rounding rule with which
runtime/kernels/gptq_columns_numba.py quantizes the columns between fits):
`GroupGrids` here; spqr.py passes its own (small groups, quantized
statistics, outliers).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import rtn
from layerwise import (check_problem, damp, damping, inverse_hessian_factor, layer_stats, undamped_losses,
                       zero_dead_columns)
from runtime.formats.uniform import PER_ROW, UniformTensor, check_params
from runtime.kernels.gptq_columns_numba import round_columns
from runtime.errors import UserError
from runtime.quant_grid import find_grid
from runtime.method_contract import MethodContract, Option, QuantSpec


NO_THRESHOLDS = np.zeros(0)  # `round_columns` without outliers
NO_OUTLIERS = np.zeros((0, 0), dtype=bool)


@dataclass
class GPTQParams:
    bits: int = 4  # 2, 3, 4 or 8
    group_size: int = 128  # input columns per scale (a multiple of 32); 0 or -1: one scale per row
    sym: bool = False  # zero point fixed at 2**(bits-1)
    act_order: bool = False  # quantize columns by descending H_jj
    percdamp: float = 0.01  # dampening, as a fraction of mean(diag H)
    blocksize: int = 128  # columns per lazy batch update
    static_groups: bool = False  # fit all group grids on the original W before any update

    @property
    def groups(self) -> int:
        """The group size the format stores: PER_ROW for one group per row."""
        return PER_ROW if self.group_size in (0, PER_ROW) else self.group_size

    def check(self) -> None:
        """UserError unless the uniform format stores these bits and groups."""
        check_params(self.bits, self.groups)


def from_tag(spec: QuantSpec) -> GPTQParams:
    """The parameters a tag asks for: absent group, one per row."""
    if "static" in spec.options and not spec.group_size:
        raise UserError(f"tag {spec.tag!r}: 'static' fixes the grids of groups; give a group size (e.g. g128)")
    return GPTQParams(bits=spec.bits, group_size=spec.group_size, sym="sym" in spec.options,
                      act_order="act" in spec.options, static_groups="static" in spec.options)


@dataclass
class GPTQResult:
    """What Algorithm 1 chose, in the original column order."""
    codes: np.ndarray  # [out, in] uint8
    scales: np.ndarray  # [n_groups, out] float32 (float16-exact)
    zeros: np.ndarray  # [n_groups, out] int32
    g_idx: np.ndarray  # [in] int32 group of each column
    Q: np.ndarray  # [out, in] float32 the quantized weights, as the algorithm used them
    row_losses: np.ndarray  # [out] float64 each row's proxy loss tr((W − Q) H (W − Q)ᵀ) (`obs_columns`)


def quantize(W: np.ndarray, H: np.ndarray, params: GPTQParams = GPTQParams()) -> tuple[UniformTensor, dict]:
    """W [out, in], H [in, in] -> (UniformTensor, stats): stats["loss"] and stats["rtn_loss"] are
    the proxy losses of GPTQ and of RTN with the same grid settings, both measured with H, and
    stats["ratio"] the first over the second (layerwise.layer_stats)."""
    return quantize_shared([W], H, params)[0]


def quantize_shared(weights: list, H: np.ndarray, params: GPTQParams = GPTQParams()) -> list:
    """`quantize` for several weights [out_k, in] that read the same input (one H): [(packed, stats)].

    Rows never interact in Algorithm 1, so the weights are stacked and quantized in one pass,
    sharing the factorisation of H; each result equals `quantize` of that weight alone (bit for bit when
    the BLAS rounds a row's products the same whatever the other rows: OpenBLAS on one thread).
    """
    weights = [np.asarray(W, dtype=np.float32) for W in weights]  # [out_k, in] each
    result = quantize_columns(np.concatenate(weights), H, params)
    group_size = params.groups
    rtn_params = rtn.RTNParams(bits=params.bits, group_size=group_size, sym=params.sym)
    out, start = [], 0
    for W in weights:
        rows = slice(start, start + W.shape[0])
        start = rows.stop
        packed = UniformTensor.from_codes(result.codes[rows], result.scales[:, rows], result.zeros[:, rows],
                                          bits=params.bits, group_size=group_size, sym=params.sym,
                                          g_idx=result.g_idx)
        out.append((packed, layer_stats(W, rtn.quantize(W, rtn_params).dequantize(), H,
                                        loss=float(result.row_losses[rows].sum()))))
    return out


class GroupGrids:
    """GPTQ's grids: a `find_grid` scale and integer zero per group and output row.

    The interface through which Algorithm 1 (`obs_columns`) chooses codes;
    spqr.py supplies another with the same two methods.
    """

    def __init__(self, bits: int, sym: bool, n_groups: int, n_out: int):
        self.bits, self.sym = bits, sym
        self.scales = np.empty((n_groups, n_out), dtype=np.float32)  # [n_groups, out]
        self.zeros = np.empty((n_groups, n_out), dtype=np.int32)  # [n_groups, out]

    def fit(self, g: int, weights: np.ndarray, hinv_diag) -> None:
        """Fit group g's grid on its weights [out, width] as they are now (hinv_diag: U_jj of its columns)."""
        self.scales[g], self.zeros[g] = find_grid(weights, self.bits, self.sym)

    def kernel_grid(self) -> tuple:
        """(scales [n_groups, out] float32, zeros float32, maxq, GPTQ's rounding, no outlier thresholds, no
        outlier mask) as `round_columns` takes them."""
        return self.scales, self.zeros.astype(np.float32), (1 << self.bits) - 1, True, NO_THRESHOLDS, NO_OUTLIERS


def prepare(W: np.ndarray, H: np.ndarray, act_order: bool, percdamp: float):
    """(W0 float32 [out, in] with dead columns zeroed, perm [in] the quantization order, U float32 [in, in] the
    upper Cholesky factor of the inverse of the permuted, dampened H), the set-up of Algorithm 1, in float32
    as the reference implementation factors H (OPT-1.3b's fc2: 10 s in float64 -> 4 s on 2 cores)."""
    W0, H = zero_dead_columns(W, H, np.float32)  # [out, in], [in, in] copies
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(H.shape[0])  # [in]
    H = H[np.ix_(perm, perm)] if act_order else H  # [in, in]
    return W0, perm, inverse_hessian_factor(damp(H, percdamp, overwrite=True))


def obs_columns(Wq: np.ndarray, U: np.ndarray, grids, width: int, blocksize: int, static_groups=None):
    """Algorithm 1's loop (see the module docstring) over Wq [out, in] (permuted, float32, updated in place).

    Position j is in group j // width, whose grid `grids.fit` fits when its first column comes up; with
    static_groups [in] (the group of each position) the grids are already fitted. Returns (codes uint8
    [out, in], Q float32 [out, in], group of each position [in]), all in permuted order, and err_sq float64
    [out], each row's Σ_j e_j² of the scaled errors e_j = (w_j − q_j) / U_jj. The updates make W0 − Q = E U
    (E [out, in] the scaled errors, U upper triangular) and U (H + λI) Uᵀ = I, so err_sq is each row's loss
    under the dampened H, without a product by H (the reference sums the same (w − q)² / U_jj² as its
    Losses; `layerwise.undamped_losses` takes it to H itself: equal to the product to float32 rounding, 1e-7
    relative at OPT-1.3b's fc2, where the product took 1.5 s).
    """
    n_out, n_in = Wq.shape

    def runs(b1: int, b2: int):
        """(first, stop) of the block's runs of columns, split where a group's grid is fitted."""
        starts = [i for i in range(b2 - b1) if i == 0 or (static_groups is None and (b1 + i) % width == 0)]
        return zip(starts, starts[1:] + [b2 - b1])

    codes = np.empty((n_out, n_in), dtype=np.uint8)  # [out, in] permuted columns
    Q = np.empty((n_out, n_in), dtype=np.float32)  # [out, in] permuted columns
    group_of = np.arange(n_in) // width if static_groups is None else static_groups  # [in]
    err_sq = np.zeros(n_out)  # [out]
    for b1 in range(0, n_in, blocksize):  # the block's columns as rows (contiguous; a column of [out, in] is not)
        b2 = min(b1 + blocksize, n_in)
        W1 = np.ascontiguousarray(Wq[:, b1:b2].T)  # [B, out]
        E1 = np.zeros_like(W1)  # [B, out] scaled errors of the block
        codes1 = np.empty((b2 - b1, n_out), dtype=np.uint8)  # [B, out]
        Q1 = np.empty((b2 - b1, n_out), dtype=np.float32)  # [B, out]
        for i, stop in runs(b1, b2):  # the block's columns in runs between group starts
            j = b1 + i  # permuted position
            if static_groups is None and j % width == 0:  # group start: its grid from the weights updated so far
                ahead = Wq[:, b2:j + width] - E1[:i].T @ U[b1:j, b2:j + width]  # [out, past block]
                grids.fit(group_of[j], np.hstack([W1[i:i + width].T, ahead]), np.diag(U)[j:j + width])
            round_columns(W1, E1, codes1, Q1, U, b1, i, stop, group_of, *grids.kernel_grid())
        codes[:, b1:b2], Q[:, b1:b2] = codes1.T, Q1.T
        Wq[:, b2:] -= E1.T @ U[b1:b2, b2:]  # [out, in - b2] lazy batch update
        err_sq += np.einsum("bo,bo->o", E1, E1, dtype=np.float64)  # [out]
    return codes, Q, group_of.astype(np.int32), err_sq


def quantize_columns(W: np.ndarray, H: np.ndarray, params: GPTQParams) -> GPTQResult:
    """Algorithm 1 on W [out, in] with Hessian H [in, in] (see the module docstring)."""
    W, H = check_problem(W, H)
    n_out, n_in = W.shape
    params.check()
    group_size = params.groups
    width = n_in if group_size == PER_ROW else group_size
    n_groups = -(-n_in // width)

    W0, perm, U = prepare(W, H, params.act_order, params.percdamp)
    grids = GroupGrids(params.bits, params.sym, n_groups, n_out)
    static_groups = None
    if params.static_groups:
        for g in range(n_groups):
            grids.fit(g, W0[:, g * width:(g + 1) * width], None)
        static_groups = perm // width  # [in]
    # the loop in float32, as the reference implementation (half the time of float64 at 1B scale)
    # np.take keeps the rows contiguous; W0[:, perm] is column-major, which made this loop 5x slower
    codes, Q, group_of, err_sq = obs_columns(np.take(W0, perm, axis=1), U, grids, width, params.blocksize,
                                             static_groups)

    inverse = np.argsort(perm)  # [in]
    Q = np.take(Q, inverse, axis=1)  # [out, in] original column order
    return GPTQResult(codes=np.take(codes, inverse, axis=1), scales=grids.scales, zeros=grids.zeros, g_idx=group_of[inverse],
                      Q=Q, row_losses=undamped_losses(err_sq, W0, Q, H, damping(H, params.percdamp)))


CONTRACTS = (MethodContract(
    "gptq", "GPTQ: second-order updates on calibration data", bits=(2, 3, 4, 8), params=from_tag,
    quantize=quantize_shared, examples=("gptq4g128", "gptq3", "gptq4g128act"),
    options=(Option("sym", "--sym", "symmetric grid (no zero point)"),
             Option("act", "--act-order", "quantize columns by descending Hessian diagonal"),
             Option("static", "--static-groups", "fit every group's grid before any update (needs a group)")),
    group_multiple=32, group_field="group_size", calibration="hessian"),)
