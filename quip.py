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
update rule; `ldlq` (layerwise.py, shared with quipsharp.py) also runs the block form of QuIP# (Tseng et al. 2024,
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
from layerwise import (ScalarGrid, check_problem, damp, damping, layer_stats, ldlq, undamped_losses,
                       zero_dead_columns)
from runtime.errors import UserError
from runtime.formats.incoherent import IncoherentTensor, transforms
from runtime.formats.uniform import PER_ROW, UniformTensor, check_params
from runtime.quant_grid import fp16_ceil
from runtime.method_contract import MethodContract


@dataclass
class QuIPParams:
    bits: int = 2  # 2, 3 or 4 (8 works too)
    seed: int = 0  # seed of the random orthogonal transforms (stored with the weight)
    percdamp: float = 0.01  # dampening, as a fraction of mean(diag H)
    rescale: bool = True  # diagonal rescaling of W and H before the transforms
    range_factor: float = 2.4  # ρ: the grid spans ±ρ · RMS of the processed weight

    def check(self) -> None:
        """UserError unless the uniform format stores these bits and the grid has a positive range."""
        check_params(self.bits, PER_ROW)
        if self.range_factor <= 0:
            raise UserError(f"quip: range_factor must be positive, got {self.range_factor}")


@dataclass
class Processed:
    """W and H after Algorithm 1's rescaling and incoherence steps."""
    W: np.ndarray  # [out, in] float64  U (W diag(d)) Vᵀ
    H: np.ndarray  # [in, in] float32   V diag(d)⁻¹ H diag(d)⁻¹ Vᵀ (LDLQ factors it in float64)
    rescale: np.ndarray  # [in] float16  d


def preprocess(W: np.ndarray, H: np.ndarray, params: QuIPParams) -> Processed:
    """Algorithm 1 up to the grid: dampening, diagonal rescaling, W ← U W Vᵀ, H ← V H Vᵀ."""
    W, H = zero_dead_columns(W, H, dtype=np.float32)  # [out, in], [in, in] copies: changed in place below
    H = damp(H, params.percdamp, overwrite=True)  # [in, in]
    rescale = np.ones(W.shape[1], dtype=np.float16)  # [in]
    if params.rescale:
        column_norms = np.maximum(np.einsum("oi,oi->i", W, W, dtype=np.float64), 1e-8)  # [in] diag(WᵀW)
        ratio = np.maximum(np.diag(H), 1e-8) / column_norms  # [in]
        rescale = np.clip(ratio ** 0.25, 1e-4, 1e4).astype(np.float16)  # [in] stored as float16
    d = rescale.astype(np.float32)  # [in]
    W *= d  # [out, in]
    H /= d[:, None]  # [in, in]
    H /= d[None, :]
    transform_out, transform_in = transforms(W.shape, params.seed)
    W = transform_out.apply_to_columns(transform_in.apply(W)).astype(np.float64)  # [out, in]  U (W Vᵀ)
    H = transform_in.apply_to_columns(transform_in.apply(H))  # [in, in] float32  V (H Vᵀ)
    return Processed(W=W, H=H, rescale=rescale)


def midrise_quantizer(step: float, bits: int) -> ScalarGrid:
    """Q of QuIP's grid: codes clip(round(w/step + 2^(b−1) − ½), 0, 2^b − 1), values (q − 2^(b−1) + ½)·step."""
    return ScalarGrid(step, (1 << (bits - 1)) - 0.5, (1 << bits) - 1)


def quantize(W: np.ndarray, H: np.ndarray, params: QuIPParams = QuIPParams()) -> tuple[IncoherentTensor, dict]:
    """W [out, in], H [in, in] -> (IncoherentTensor, stats): stats["loss"] the proxy loss
    tr((W − Q) H (W − Q)ᵀ) of the stored weight in the original space, stats["rtn_loss"] that of
    per-row RTN at the same bits, stats["ratio"] the first over the second."""
    params.check()
    W, H = check_problem(W, H)  # [out, in] float32, [in, in] float64
    n_out, n_in = W.shape
    processed = preprocess(W, H, params)
    rms = float(np.sqrt(np.mean(processed.W ** 2)))
    step = 2 * params.range_factor * max(rms, 1e-12) / ((1 << params.bits) - 1)
    step = float(fp16_ceil(np.array([step], dtype=np.float32))[0])  # float16-exact, as stored
    _, codes, damped_losses = ldlq(processed.W, processed.H, midrise_quantizer(step, params.bits))
    inner = UniformTensor.from_codes(codes, np.full((1, n_out), step, dtype=np.float32),
                                     np.full((1, n_out), 1 << (params.bits - 1), dtype=np.int32),
                                     bits=params.bits, group_size=PER_ROW, sym=True, per_tensor=True)
    packed = IncoherentTensor(inner, processed.rescale, seed=params.seed, midrise=True)
    rtn_weight = rtn.quantize(W, rtn.RTNParams(bits=params.bits, group_size=PER_ROW)).dequantize()  # [out, in]
    Q = packed.dequantize()  # [out, in] float32
    # the rescaling and the orthogonal transforms keep tr((W − Q) H (W − Q)ᵀ): LDLQ's own loss is this one's
    loss = undamped_losses(damped_losses, W, Q, H, damping(H, params.percdamp))  # [out]
    return packed, layer_stats(W, rtn_weight, H, loss=float(loss.sum()))


def quantize_shared(weights: list, H: np.ndarray, params: QuIPParams = QuIPParams()) -> list:
    """`quantize` for several weights [out_k, in] that read the same input (one H): [(packed, stats)].

    Each weight has its own rescaling and grid, so each is processed on its own (same seed).
    """
    return [quantize(W, H, params) for W in weights]


CONTRACTS = (MethodContract(
    "quip", "QuIP: incoherence processing + LDLQ on the uniform grid", bits=(2, 3, 4),
    params=lambda spec: QuIPParams(bits=spec.bits), quantize=quantize_shared, examples=("quip2",),
    calibration="hessian"),)
