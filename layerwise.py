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

Every method reports its result the same way (`layer_stats`): "loss", the
proxy loss of the packed weight, "rtn_loss", that of round-to-nearest with
comparable grid settings, and "ratio", the first over the second.

LDLQ (QuIP §3, `ldlq`) and its block form BlockLDLQ (QuIP#, Tseng et al.
2024, §4.1) round the columns in order with the errors of the columns before
fed forward through the LDL factor of H; QuIP shows it is GPTQ's update rule.
quip.py runs it on a scalar grid, quipsharp.py on the E8P codebook.
"""
from __future__ import annotations

import numpy as np

from runtime.errors import UserError

LAZY_BLOCK = 128  # columns between lazy batch updates of the fed-back errors in `ldlq`
INVERSE_LEAF = 128  # size below which `lower_triangular_inverse` inverts a diagonal block directly


def check_problem(W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W float32 [out, in], H float64 [in, in]); UserError unless their shapes fit together and both
    are finite."""
    W = np.asarray(W, dtype=np.float32)  # [out, in]
    H = np.asarray(H, dtype=np.float64)  # [in, in]
    if W.ndim != 2 or 0 in W.shape:
        raise UserError(f"the weight must be a non-empty 2-D array [out, in], got shape {list(W.shape)}")
    n_in = W.shape[1]
    if H.shape != (n_in, n_in):
        raise UserError(f"the Hessian must be [{n_in}, {n_in}] for a weight {list(W.shape)}, got {list(H.shape)}")
    if not (np.isfinite(W).all() and np.isfinite(H).all()):
        raise UserError("the weight or Hessian contains NaN or infinity; check the checkpoint and the calibration "
                        "data")
    return W, H


def zero_dead_columns(W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W, H) as float64 copies, with every dead column (H_jj = 0) zeroed in W and H_jj set to 1."""
    W = np.array(W, dtype=np.float64)  # [out, in]
    H = np.array(H, dtype=np.float64)  # [in, in]
    dead = np.diag(H) == 0  # [in]
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def damp(H: np.ndarray, percdamp: float) -> np.ndarray:
    """H + percdamp · mean(diag H) · I [in, in] (a new array)."""
    H = np.array(H, dtype=np.float64)  # [in, in]
    H[np.diag_indices_from(H)] += percdamp * float(np.mean(np.diag(H)))
    return H


def reversed_cholesky(H: np.ndarray) -> np.ndarray:
    """R [in, in] upper triangular with H = R Rᵀ: J L J for the Cholesky factor L of J H J."""
    try:
        L = np.linalg.cholesky(H[::-1, ::-1])  # [in, in] lower, J H J = L Lᵀ
    except np.linalg.LinAlgError:
        raise UserError("the Hessian is not positive definite even after dampening; "
                        "raise percdamp or use more calibration samples") from None
    return L[::-1, ::-1]


def inverse_hessian_factor(H: np.ndarray) -> np.ndarray:
    """U [in, in]: the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U), float64, from one factorisation of H.

    The GPTQ reference computes it as cholesky(inverse(H)).T; with H = R Rᵀ (`reversed_cholesky`),
    H⁻¹ = R⁻ᵀ R⁻¹, and R⁻¹ = J L⁻¹ J is upper triangular with a positive diagonal, hence that factor.
    """
    L = reversed_cholesky(H)[::-1, ::-1]  # [in, in] lower
    return np.ascontiguousarray(lower_triangular_inverse(L)[::-1, ::-1])  # [in, in] upper


def lower_triangular_inverse(L: np.ndarray) -> np.ndarray:
    """L⁻¹ [n, n] of a lower triangular L [n, n] with a nonzero diagonal, by halves as LAPACK's trtri:

        [[A, 0], [C, B]]⁻¹ = [[A⁻¹, 0], [−B⁻¹ C A⁻¹, B⁻¹]]

    two matrix products per level, about n³/3 multiply-adds in all where a general inverse (LU, then n
    solves) takes about 2n³: OPT-1.3b's fc2 (8192 inputs) 18 s -> 4 s on 2 cores."""
    n = L.shape[0]
    if n <= INVERSE_LEAF:
        return np.tril(np.linalg.inv(L))  # exact zeros above the diagonal (LU leaves rounding there)
    h = n // 2
    a_inv, b_inv = lower_triangular_inverse(L[:h, :h]), lower_triangular_inverse(L[h:, h:])  # [h, h], [n-h, n-h]
    out = np.zeros((n, n), dtype=np.result_type(L.dtype, np.float32))  # [n, n]
    out[:h, :h] = a_inv
    out[h:, h:] = b_inv
    out[h:, :h] = -(b_inv @ (L[h:, :h] @ a_inv))  # [n-h, h]
    return out


def proxy_loss(W: np.ndarray, Q: np.ndarray, H: np.ndarray) -> float:
    """tr((W − Q) H (W − Q)ᵀ): the layer-wise squared output error the Hessian H measures."""
    D = (np.asarray(W, np.float64) - np.asarray(Q, np.float64))  # [out, in]
    return float(np.einsum("oi,ij,oj->", D, H, D, optimize=True))


def layer_stats(W: np.ndarray, Q: np.ndarray, Q_rtn: np.ndarray, H: np.ndarray) -> dict:
    """The record every method returns for a layer: "loss" of Q, "rtn_loss" of the RTN weight Q_rtn
    (both [out, in], measured with H) and "ratio", the first over the second."""
    loss, rtn_loss = proxy_loss(W, Q, H), proxy_loss(W, Q_rtn, H)
    return {"loss": loss, "rtn_loss": rtn_loss, "ratio": loss / rtn_loss if rtn_loss > 0 else 1.0}


def block_ldl(H: np.ndarray, block: int) -> np.ndarray:
    """Ů [in, in]: H = (Ů + I) D (Ů + I)ᵀ with Ů block strictly upper triangular (blocks of `block`).

    With H = R Rᵀ (`reversed_cholesky`) and B the block diagonal of R, Ů + I = R B⁻¹ and D = B Bᵀ.
    """
    n = H.shape[0]
    R = reversed_cholesky(H)  # [in, in] upper, H = R Rᵀ
    feedback = np.empty_like(R)  # [in, in] R B⁻¹ − I
    for k0 in range(0, n, block):
        k1 = min(k0 + block, n)
        diag_block = R[k0:k1, k0:k1]  # [g, g] upper
        feedback[:, k0:k1] = np.linalg.solve(diag_block.T, R[:, k0:k1].T).T  # [in, g]  R_k B_kk⁻¹
        feedback[k0:k1, k0:k1] = 0  # the unit diagonal block minus I
    return np.triu(feedback, 1)


def ldlq(W: np.ndarray, H: np.ndarray, quantizer, block: int = 1):
    """LDLQ / BlockLDLQ of W [out, in] with Hessian H [in, in]: (Ŵ [out, in], codes), where

        Ŵ_k = Q(W_k + (W_{<k} − Ŵ_{<k}) Ů_{<k, k})   for each block k of `block` columns.

    `quantizer(target [out, g]) -> (values [out, g], codes [..., out, c])` rounds one block of
    columns; the codes of all blocks are joined along their last axis. `block` must divide in.
    """
    n_out, n_in = W.shape
    if n_in % block:
        raise UserError(f"ldlq: the block size {block} must divide the input features {n_in}")
    feedback = block_ldl(np.asarray(H, dtype=np.float64), block)  # [in, in]
    W = np.asarray(W, dtype=np.float64)  # [out, in]
    errors = np.zeros((n_out, n_in))  # [out, in] W − Ŵ of the columns done
    quantized = np.empty((n_out, n_in))  # [out, in]
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
            codes.append(block_codes)
    return quantized, np.concatenate(codes, axis=-1)
