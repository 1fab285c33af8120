"""The layer-wise math that GPTQ, SpQR, QuIP and QuIP# share: one linear layer, its weight and its Hessian.

Each of these methods minimises the proxy loss of one linear layer,

    tr((W − Q) H (W − Q)ᵀ),   W [out, in] the float weight, Q its quantized value,
                              H = 2/n · Σ x xᵀ [in, in] of the layer's calibration inputs,

and prepares H the same way before it (GPTQ, Frantar et al. 2022, §4 Step 3;
QuIP, Chee et al. 2023, §3):

    dead columns (H_jj = 0): H_jj = 1, W[:, j] = 0      (no input ever reaches them)
    H += percdamp · mean(diag H) · I                    (dampening)
    J H J = L Lᵀ (Cholesky), J the reversal:
        H = R Rᵀ with R = J L J upper triangular        (QuIP's LDL factor, `reversed_cholesky`)
        H⁻¹ = Uᵀ U with U = J L⁻¹ J upper triangular    (GPTQ's Cholesky factor of H⁻¹)

The Cholesky factor and the triangular inverse go by blocks of matrix
products (`cholesky_lower`, `lower_triangular_inverse`), in the dtype they are
given: GPTQ, SpQR and QuIP# factor in float32 as their reference code does
by default, QuIP in float64.

Every method reports its result the same way (`layer_stats`): "loss", the
proxy loss of the packed weight, "rtn_loss", that of round-to-nearest with
comparable grid settings, and "ratio", the first over the second.

LDLQ (QuIP §3, `ldlq`) and its block form BlockLDLQ (QuIP#, Tseng et al.
2024, §4.1) round the columns in order with the errors of the columns before
fed forward through the LDL factor of H; QuIP shows it is GPTQ's update rule.
quip.py runs it on a scalar grid, quipsharp.py on the E8P codebook, each
with a compiled loop for a lazy batch of columns; rows never read each
other, so those loops take the rows in ranges, one per core.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from runtime.errors import UserError
from runtime.kernels import ldlq_numba

LAZY_BLOCK = 128  # columns between lazy batch updates of the fed-back errors in `ldlq`
ROWS_PER_THREAD = 256  # `ldlq`'s compiled loop takes another thread per this many rows, up to the cores
TRIANGLE_BLOCK = 256  # rows and columns per diagonal block of `cholesky_lower` and `lower_triangular_inverse`


def check_problem(W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W float32 [out, in], H [in, in] float32 as given, else float64); UserError unless their shapes fit
    together and both are finite (checked through their sums: no temporary the size of H)."""
    W = np.asarray(W, dtype=np.float32)  # [out, in]
    H = np.asarray(H)  # [in, in]
    H = H if H.dtype == np.float32 else H.astype(np.float64, copy=False)
    if W.ndim != 2 or 0 in W.shape:
        raise UserError(f"the weight must be a non-empty 2-D array [out, in], got shape {list(W.shape)}")
    n_in = W.shape[1]
    if H.shape != (n_in, n_in):
        raise UserError(f"the Hessian must be [{n_in}, {n_in}] for a weight {list(W.shape)}, got {list(H.shape)}")
    if not (math.isfinite(W.sum(dtype=np.float64)) and math.isfinite(H.sum(dtype=np.float64))):
        raise UserError("the weight or Hessian contains NaN or infinity; check the checkpoint and the calibration "
                        "data")
    return W, H


def zero_dead_columns(W: np.ndarray, H: np.ndarray, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """(W, H) as copies of `dtype`, with every dead column (H_jj = 0) zeroed in W and H_jj set to 1."""
    W = np.array(W, dtype=dtype)  # [out, in]
    H = np.array(H, dtype=dtype)  # [in, in]
    dead = np.diag(H) == 0  # [in]
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def damping(H: np.ndarray, percdamp: float) -> float:
    """λ = percdamp · mean(diag H), the dead columns' H_jj counted as the 1 `zero_dead_columns` gives them."""
    diagonal = np.diag(H)  # [in]
    return percdamp * float(np.mean(np.where(diagonal == 0, 1, diagonal)))


def damp(H: np.ndarray, percdamp: float, overwrite: bool = False) -> np.ndarray:
    """H + λ I [in, in] (`damping`) of H's dtype (float32 or float64): a new array, or H itself changed with
    `overwrite`."""
    H = H if overwrite else np.array(H, dtype=np.result_type(H.dtype, np.float32))  # [in, in]
    H[np.diag_indices_from(H)] += damping(H, percdamp)
    return H


def cholesky_lower(H: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """L [n, n] lower triangular with H = L Lᵀ, in H's dtype, by blocks of TRIANGLE_BLOCK (right-looking, as
    LAPACK's potrf): each diagonal block factored directly, the panel below it multiplied by that factor's
    inverse, the trailing lower triangle updated block row by block row (matrix products: float32 at BLAS's
    speed, where NumPy's own cholesky computes float32 in double precision, 3x the time at 8192).
    With `overwrite`, H (C-contiguous float) becomes L: no second n x n array. UserError when H is not
    positive definite."""
    n = H.shape[0]
    A = H if overwrite else np.array(H, dtype=np.result_type(H.dtype, np.float32), order="C")  # [n, n] becomes L
    for k0 in range(0, n, TRIANGLE_BLOCK):
        k1 = min(k0 + TRIANGLE_BLOCK, n)
        try:
            A[k0:k1, k0:k1] = np.linalg.cholesky(A[k0:k1, k0:k1])  # [b, b] lower
        except np.linalg.LinAlgError:
            raise UserError("the Hessian is not positive definite even after dampening; "
                            "raise percdamp or use more calibration samples") from None
        A[k0:k1, k1:] = 0
        if k1 == n:
            break
        panel = A[k1:, k0:k1] @ np.linalg.inv(A[k0:k1, k0:k1]).T  # [n - k1, b]  H_ik L_kk⁻ᵀ
        A[k1:, k0:k1] = panel
        for i0 in range(k1, n, TRIANGLE_BLOCK):  # lower triangle of the trailing matrix, one block row at a time
            i1 = min(i0 + TRIANGLE_BLOCK, n)
            A[i0:i1, k1:i1] -= panel[i0 - k1:i1 - k1] @ panel[:i1 - k1].T  # [b, i1 - k1]
    return A


def reversed_cholesky(H: np.ndarray, dtype=None) -> np.ndarray:
    """R [in, in] upper triangular with H = R Rᵀ: J L J for the Cholesky factor L of J H J, in `dtype` (default:
    H's), from one copy of H (the reversed matrix, which the factor then overwrites)."""
    reversed_copy = np.array(H[::-1, ::-1], dtype=dtype or np.result_type(H.dtype, np.float32), order="C")
    return cholesky_lower(reversed_copy, overwrite=True)[::-1, ::-1]


def inverse_hessian_factor(H: np.ndarray) -> np.ndarray:
    """U [in, in]: the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U), in H's dtype, from one factorisation of H.

    The GPTQ reference computes it as cholesky(inverse(H)).T; with H = R Rᵀ (`reversed_cholesky`),
    H⁻¹ = R⁻ᵀ R⁻¹, and R⁻¹ = J L⁻¹ J is upper triangular with a positive diagonal, hence that factor.
    """
    L = cholesky_lower(H[::-1, ::-1])  # [in, in] lower: its own copy, which the inverse then overwrites
    return np.ascontiguousarray(lower_triangular_inverse(L, overwrite=True)[::-1, ::-1])  # [in, in] upper


def lower_triangular_inverse(L: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """L⁻¹ [n, n] of a lower triangular L [n, n] with a nonzero diagonal, in L's dtype, one block row of
    TRIANGLE_BLOCK at a time (forward substitution by blocks, as LAPACK's trtri):

        X_ii = L_ii⁻¹,   X_ij = −L_ii⁻¹ Σ_{j ≤ k < i} L_ik X_kj   (j < i)

    each sum one matrix product over the nonzero rows of X's block column only, about n³/3 multiply-adds in
    all (OPT-1.3b's fc2, 8192 inputs, float32: 1.3 s on 2 cores, where inverting by halves with whole
    products took 2.8 s). Block row i reads only L's row i and X's rows above it, so with `overwrite` X
    replaces L (a float array) row by row."""
    n, b = L.shape[0], TRIANGLE_BLOCK
    X = L if overwrite else np.array(L, dtype=np.result_type(L.dtype, np.float32))  # [n, n] L, becoming L⁻¹
    for i0 in range(0, n, b):
        i1 = min(i0 + b, n)
        diagonal = np.tril(np.linalg.inv(L[i0:i1, i0:i1]))  # [b, b] exact zeros above (LU leaves rounding)
        sums = np.empty((i1 - i0, i0), dtype=X.dtype)  # [b, i0]
        for j0 in range(0, i0, b):
            sums[:, j0:j0 + b] = L[i0:i1, j0:i0] @ X[j0:i0, j0:j0 + b]  # [b, b]  Σ_k L_ik X_kj
        X[i0:i1, :i0] = -(diagonal @ sums)  # [b, i0]
        X[i0:i1, i0:i1] = diagonal
        X[i0:i1, i1:] = 0
    return X


def proxy_loss(W: np.ndarray, Q: np.ndarray, H: np.ndarray) -> float:
    """tr((W − Q) H (W − Q)ᵀ): the layer-wise squared output error the Hessian H measures, of a quantized
    weight Q [out, in]. One float32 matrix product, summed in float64: a statistic, about 1e-6 relative of
    the float64 value, at a quarter of its time."""
    D = np.asarray(W, dtype=np.float32) - np.asarray(Q, dtype=np.float32)  # [out, in]
    DH = D @ np.asarray(H, dtype=np.float32)  # [out, in]
    return float(np.einsum("oi,oi->", D, DH, dtype=np.float64))


def undamped_losses(damped: np.ndarray, W: np.ndarray, Q: np.ndarray, H: np.ndarray, lam: float) -> np.ndarray:
    """Each row's proxy loss tr((W − Q) H (W − Q)ᵀ) [out] float64 under H itself, from `damped` [out], the
    loss under the matrix a method factored: H with each dead column's H_jj set to 1 (`zero_dead_columns`,
    which zeroes those columns of W: W0) plus λ I (`damp`). That matrix is H + λ I + Σ_dead e_j e_jᵀ, so

        loss = damped − λ ‖W0 − Q‖² − Σ_dead ‖(W0 − Q)_j‖²    per row

    (GPTQ's and LDLQ's own errors give `damped` without a product by H). W [out, in]: with or without its
    dead columns zeroed."""
    dead = np.diag(H) == 0  # [in]
    D = np.asarray(W, dtype=np.float64) - Q  # [out, in]
    D[:, dead] = -Q[:, dead]  # W0 − Q
    return damped - lam * np.einsum("oi,oi->o", D, D) - np.einsum("oi,oi->o", D[:, dead], D[:, dead])  # [out]


def layer_stats(W: np.ndarray, Q_rtn: np.ndarray, H: np.ndarray, loss: float) -> dict:
    """The record every method returns for a layer: "loss", the proxy loss of its packed weight (each method
    has it without a product by H: `undamped_losses`), "rtn_loss" of the RTN weight Q_rtn [out, in] of W
    [out, in], measured with H, and "ratio", the first over the second."""
    rtn_loss = proxy_loss(W, Q_rtn, H)
    return {"loss": loss, "rtn_loss": rtn_loss, "ratio": loss / rtn_loss if rtn_loss > 0 else 1.0}


@dataclass(frozen=True)
class ScalarGrid:
    """LDLQ's quantizer of single columns on the uniform grid of levels (q − center) · step, q = 0 … maxq
    (QuIP's midrise grid has center 2^(b−1) − ½): `ldlq` runs its columns in a Numba loop."""
    step: float
    center: float
    maxq: int  # at most 255 (uint8 codes)

    def __call__(self, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values [out, g], codes [out, g] uint8) of target [out, g]: clip(rint(target / step + center))."""
        codes = np.clip(np.rint(target / self.step + self.center), 0, self.maxq)  # [out, g]
        return (codes - self.center) * self.step, codes.astype(np.uint8)

    def new_codes(self, n_out: int, n_in: int) -> np.ndarray:
        """The codes `ldlq` fills: [out, in] uint8."""
        return np.empty((n_out, n_in), dtype=np.uint8)

    def round_batch(self, targets, weights, feedback, diagonal, quantized, errors, codes, losses) -> None:
        """`ldlq`'s lazy batch of columns (block 1) in runtime/kernels/ldlq_numba.py's loop."""
        ldlq_numba.round_batch(targets, weights, np.ascontiguousarray(feedback.T), diagonal[:, 0, 0], self.step,
                               self.center, float(self.maxq), quantized, errors, codes, losses)


def block_ldl(H: np.ndarray, block: int, dtype=np.float64, factor_dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """(Ů [in, in] of `dtype`, B [in / block, block, block] float64): H = (Ů + I) D (Ů + I)ᵀ with Ů block
    strictly upper triangular (blocks of `block`) and D block diagonal, D_k = B_k B_kᵀ.

    With H = R Rᵀ (`reversed_cholesky` in `factor_dtype`) and B the block diagonal of R, Ů + I = R B⁻¹ and
    D = B Bᵀ; Ů in the memory of one copy of R in `dtype`.
    """
    n = H.shape[0]
    R = reversed_cholesky(H, factor_dtype)  # [in, in] upper
    diagonal = np.stack([R[k0:k0 + block, k0:k0 + block] for k0 in range(0, n, block)])  # [in / g, g, g]
    diagonal = diagonal.astype(np.float64)
    inverses = np.linalg.inv(diagonal).astype(dtype)  # [in / g, g, g]  B_kk⁻¹
    feedback = np.array(R, dtype=dtype, order="C")  # [in, in] R, becoming R B⁻¹ − I
    del R
    for k0 in range(0, n, block):  # block column k: only its rows above the diagonal block are nonzero
        k1 = min(k0 + block, n)
        feedback[:k0, k0:k1] = feedback[:k0, k0:k1] @ inverses[k0 // block]  # [k0, g]  R_k B_kk⁻¹
        feedback[k0:k1, k0:k1] = 0
    return feedback, diagonal


def ldlq(W: np.ndarray, H: np.ndarray, quantizer, block: int = 1, factor_dtype=np.float64):
    """LDLQ / BlockLDLQ of W [out, in] with Hessian H [in, in]: (Ŵ [out, in], codes, losses [out]), where

        Ŵ_k = Q(W_k + (W_{<k} − Ŵ_{<k}) Ů_{<k, k})   for each block k of `block` columns.

    `quantizer(target [out, g]) -> (values [out, g], codes [..., out, c])` rounds one block of
    columns; the codes of all blocks are joined along their last axis. `block` must divide in. H is
    factored in `factor_dtype` (`block_ldl`). A quantizer with a compiled loop (`ScalarGrid`,
    quipsharp.py's `E8PGrid`: methods `new_codes(out, in)` and `round_batch`, the same rounding) runs each
    lazy batch in it instead, the rows split over the cores (`_compiled_ldlq`).
    `losses`: each row's tr((W − Ŵ) H (W − Ŵ)ᵀ) without a product by H. The rounding residuals
    Δ_k = target_k − Ŵ_k make Δ = (W − Ŵ)(I + Ů), so the loss is tr(Δ D Δᵀ) = Σ_k ‖Δ_k B_k‖²
    (`block_ldl`), where the product took 1.5 s at OPT-1.3b's fc2.
    """
    n_out, n_in = W.shape
    if n_in % block:
        raise UserError(f"ldlq: the block size {block} must divide the input features {n_in}")
    feedback, diagonal = block_ldl(H, block, np.float32, factor_dtype)  # [in, in] the fed-back errors in float32
    #                                                   (as GPTQ's: half the time of float64), [in / g, g, g] float64
    W = np.asarray(W, dtype=np.float64)  # [out, in]
    errors = np.zeros((n_out, n_in), dtype=np.float32)  # [out, in] W − Ŵ of the columns done
    quantized = np.empty((n_out, n_in))  # [out, in]
    losses = np.zeros(n_out)  # [out]
    if hasattr(quantizer, "round_batch"):
        codes = quantizer.new_codes(n_out, n_in)
        _compiled_ldlq(W, feedback, diagonal, quantizer, block, quantized, errors, codes, losses)
        return quantized, codes, losses
    codes = []
    for b0 in range(0, n_in, LAZY_BLOCK):
        b1 = min(b0 + LAZY_BLOCK, n_in)
        targets = W[:, b0:b1] + errors[:, :b0] @ feedback[:b0, b0:b1]  # [out, B] feedback of earlier batches
        for k0 in range(b0, b1, block):
            k1 = k0 + block
            target = targets[:, k0 - b0:k1 - b0] + errors[:, b0:k0] @ feedback[b0:k0, k0:k1]  # [out, g]
            values, block_codes = quantizer(target)
            quantized[:, k0:k1] = values
            errors[:, k0:k1] = W[:, k0:k1] - values
            scaled = (target - values) @ diagonal[k0 // block]  # [out, g]  Δ_k B_k
            losses += np.einsum("og,og->o", scaled, scaled)  # [out] ‖Δ_k B_k‖²
            codes.append(block_codes)
    return quantized, np.concatenate(codes, axis=-1), losses


def _compiled_ldlq(W, feedback, diagonal, quantizer, block, quantized, errors, codes, losses) -> None:
    """`ldlq`'s loop with the quantizer's compiled `round_batch` for each lazy batch, writing quantized,
    errors, codes [..., out, in / block] and losses of all rows. Rows never read each other, so each core
    takes a contiguous range of them, its own lazy products on one BLAS thread (OpenBLAS's workers, spinning
    after each product, took the cores from a parallel loop between them: no faster than one thread)."""
    n_out, n_in = W.shape

    def run(rows: slice) -> None:
        for b0 in range(0, n_in, LAZY_BLOCK):
            b1 = min(b0 + LAZY_BLOCK, n_in)
            targets = W[rows, b0:b1] + errors[rows, :b0] @ feedback[:b0, b0:b1]  # [rows, B] earlier batches
            blocks = slice(b0 // block, b1 // block)
            quantizer.round_batch(targets, W[rows, b0:b1], feedback[b0:b1, b0:b1], diagonal[blocks],
                                  quantized[rows, b0:b1], errors[rows, b0:b1], codes[..., rows, blocks], losses[rows])

    parts = max(1, min(numba.get_num_threads(), n_out // ROWS_PER_THREAD))
    if parts == 1:
        run(slice(0, n_out))
        return
    ranges = [slice(p * n_out // parts, (p + 1) * n_out // parts) for p in range(parts)]
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(parts) as pool:
        list(pool.map(run, ranges))
