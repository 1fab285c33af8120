"""QuIP: LDLQ adaptive rounding with incoherence processing, one linear layer at a time.

Follows Chee, Cai, Kuleshov, De Sa 2023, "QuIP: 2-Bit Quantization of Large
Language Models With Guarantees": §3 (LDLQ), §4 and Algorithms 1-2
(incoherence pre- and post-processing), and the supplement's Kronecker
orthogonal matrices.

LDLQ (§3). With the Hessian factored as H = (Ů + I) D (Ů + I)ᵀ, Ů strictly
upper triangular and D diagonal, the columns are rounded in order with the
errors of the columns before fed forward:

    Ŵ_k = Q(W_k + (W_{<k} − Ŵ_{<k}) Ů_{<k, k})

The paper shows (§3, "LDLQ is equivalent to OPTQ") that this is GPTQ's
update rule; `ldlq` also runs the block form of QuIP# (Tseng et al. 2024,
§4.1 BlockLDLQ: Ů block strictly upper triangular, D block diagonal, Q a
vector quantizer of a block of g columns). Factoring: with the reversal J
and J H J = L Lᵀ (Cholesky), H = R Rᵀ for the upper triangular R = J L J;
with B the block diagonal of R, Ů + I = R B⁻¹ and D = B Bᵀ.

Incoherence processing (Algorithm 1), for W [out, in] and H [in, in]:

    H ← H + percdamp · mean(diag H) · I                  (dampening)
    d = (diag H / diag(WᵀW))^(1/4)                       (diagonal rescaling, §4 and supplement)
    W ← W diag(d);  H ← diag(d)⁻¹ H diag(d)⁻¹
    W ← U W Vᵀ;  H ← V H Vᵀ                              (U, V random orthogonal: Kronecker factors
                                                          and permutations, runtime/formats/incoherent.py)
    s = ρ ‖W‖_F / √(out · in)   (ρ = 2.4)                  (the grid: 2^b levels s(2q/(2^b − 1) − 1))
    Ŵ = LDLQ(W, H) on that grid

and the weight the stored codes stand for is Uᵀ Ŵ V diag(d)⁻¹ (Algorithm 2).
Ŵ is stored as a per-tensor symmetric `uniform` tensor with step
δ = 2s/(2^b − 1) (float16), wrapped by the `incoherent` format with the
seed, d and the half-step (midrise) shift. Dead columns (H_jj = 0) get
H_jj = 1 and a zero weight column, as in GPTQ.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import rtn
from gptq import check_problem, proxy_loss
from runtime.errors import UserError
from runtime.formats.incoherent import IncoherentTensor, transforms
from runtime.formats.uniform import PER_ROW, UniformTensor, check_params
from runtime.quant_grid import fp16_ceil

LAZY_BLOCK = 128  # columns between lazy batch updates of the fed-back errors in `ldlq`


@dataclass
class QuIPParams:
    bits: int = 2  # 2, 3 or 4 (8 works too)
    seed: int = 0  # seed of the random orthogonal transforms (stored with the weight)
    percdamp: float = 0.01  # dampening, as a fraction of mean(diag H)
    rescale: bool = True  # diagonal rescaling of W and H before the transforms
    range_factor: float = 2.4  # ρ: the grid spans ±ρ · RMS of the processed weight


@dataclass
class Processed:
    """W and H after Algorithm 1's rescaling and incoherence steps."""
    W: np.ndarray  # [out, in] float64  U (W diag(d)) Vᵀ
    H: np.ndarray  # [in, in] float64   V diag(d)⁻¹ H diag(d)⁻¹ Vᵀ
    rescale: np.ndarray  # [in] float16  d


def damp(W: np.ndarray, H: np.ndarray, percdamp: float) -> tuple[np.ndarray, np.ndarray]:
    """(W, H) float64 with dead columns zeroed (H_jj = 1) and H + percdamp · mean(diag H) · I."""
    W = np.array(W, dtype=np.float64)  # [out, in]
    H = np.array(H, dtype=np.float64)  # [in, in]
    dead = np.diag(H) == 0  # [in]
    H[dead, dead] = 1
    W[:, dead] = 0
    H[np.diag_indices_from(H)] += percdamp * float(np.mean(np.diag(H)))
    return W, H


def block_ldl(H: np.ndarray, block: int) -> np.ndarray:
    """Ů [in, in]: H = (Ů + I) D (Ů + I)ᵀ with Ů block strictly upper triangular (blocks of `block`)."""
    n = H.shape[0]
    try:
        L = np.linalg.cholesky(H[::-1, ::-1])  # [in, in] lower, J H J = L Lᵀ
    except np.linalg.LinAlgError:
        raise UserError("ldlq: the Hessian is not positive definite; raise percdamp or use more "
                        "calibration samples") from None
    R = L[::-1, ::-1]  # [in, in] upper, H = R Rᵀ
    feedback = np.empty_like(R)  # [in, in] R B⁻¹ − I
    for k0 in range(0, n, block):
        k1 = min(k0 + block, n)
        diag_block = R[k0:k1, k0:k1]  # [g, g] upper
        feedback[:, k0:k1] = np.linalg.solve(diag_block.T, R[:, k0:k1].T).T  # [in, g]  R_k B_kk⁻¹
        feedback[k0:k1, k0:k1] = 0  # the unit diagonal block minus I
    return np.triu(feedback, 1)


def ldlq(W: np.ndarray, H: np.ndarray, quantizer, block: int = 1):
    """LDLQ / BlockLDLQ of W [out, in] with Hessian H [in, in] (module docstring): (Ŵ [out, in], codes).

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


def preprocess(W: np.ndarray, H: np.ndarray, params: QuIPParams) -> Processed:
    """Algorithm 1 up to the grid: dampening, diagonal rescaling, W ← U W Vᵀ, H ← V H Vᵀ."""
    W, H = damp(W, H, params.percdamp)
    rescale = np.ones(W.shape[1], dtype=np.float16)  # [in]
    if params.rescale:
        column_norms = np.maximum(np.einsum("oi,oi->i", W, W), 1e-8)  # [in] diag(WᵀW)
        ratio = np.maximum(np.diag(H), 1e-8) / column_norms  # [in]
        rescale = np.clip(ratio ** 0.25, 1e-4, 1e4).astype(np.float16)  # [in] stored as float16
    d = rescale.astype(np.float64)  # [in]
    W = W * d  # [out, in]
    H = H / d[:, None] / d[None, :]  # [in, in]
    transform_out, transform_in = transforms(W.shape, params.seed)
    W = transform_out.apply(transform_in.apply(W).T).T.astype(np.float64)  # [out, in]  U W Vᵀ
    H = transform_in.apply(transform_in.apply(H).T).T.astype(np.float64)  # [in, in]  V H Vᵀ
    return Processed(W=W, H=(H + H.T) / 2, rescale=rescale)


def midrise_quantizer(step: float, bits: int):
    """Q of QuIP's grid: codes clip(round(w/step + 2^(b−1) − ½), 0, 2^b − 1), values (q − 2^(b−1) + ½)·step."""
    maxq = (1 << bits) - 1
    center = (1 << (bits - 1)) - 0.5

    def quantize(target):
        codes = np.clip(np.rint(target / step + center), 0, maxq)  # [out, g]
        return (codes - center) * step, codes.astype(np.uint8)

    return quantize


def quantize(W: np.ndarray, H: np.ndarray, params: QuIPParams = QuIPParams()) -> tuple[IncoherentTensor, dict]:
    """W [out, in], H [in, in] -> (IncoherentTensor, stats): stats["loss"] the proxy loss
    tr((W − Q) H (W − Q)ᵀ) of the stored weight in the original space, stats["rtn_loss"] that of
    per-row RTN at the same bits, stats["ratio"] the first over the second."""
    W, H = check_problem(W, H)  # [out, in] float32, [in, in] float64
    check_params(params.bits, PER_ROW)
    if params.range_factor <= 0:
        raise UserError(f"quip: range_factor must be positive, got {params.range_factor}")
    n_out, n_in = W.shape
    processed = preprocess(W, H, params)
    rms = float(np.sqrt(np.mean(processed.W ** 2)))
    step = 2 * params.range_factor * max(rms, 1e-12) / ((1 << params.bits) - 1)
    step = float(fp16_ceil(np.array([step], dtype=np.float32))[0])  # float16-exact, as stored
    _, codes = ldlq(processed.W, processed.H, midrise_quantizer(step, params.bits))
    inner = UniformTensor.from_codes(codes, np.full((1, n_out), step, dtype=np.float32),
                                     np.full((1, n_out), 1 << (params.bits - 1), dtype=np.int32),
                                     bits=params.bits, group_size=PER_ROW, sym=True, per_tensor=True)
    packed = IncoherentTensor(inner, processed.rescale, seed=params.seed, midrise=True)
    loss = proxy_loss(W, packed.dequantize(), H)
    rtn_loss = proxy_loss(W, rtn.quantize(W, rtn.RTNParams(bits=params.bits, group_size=PER_ROW)).dequantize(), H)
    return packed, {"loss": loss, "rtn_loss": rtn_loss, "ratio": loss / rtn_loss if rtn_loss > 0 else 1.0}


def quantize_shared(weights: list, H: np.ndarray, params: QuIPParams = QuIPParams()) -> list:
    """`quantize` for several weights [out_k, in] that read the same input (one H): [(packed, stats)].

    Each weight has its own rescaling and grid, so each is processed on its own (same seed).
    """
    return [quantize(W, H, params) for W in weights]
