"""QuIP#: randomized Hadamard incoherence and BlockLDLQ onto the E8P lattice codebook.

Follows Tseng, Chee, Sun, Kuleshov, De Sa 2024, "QuIP#: Even Better LLM
Quantization with Hadamard Incoherence and Lattice Codebooks": §3 (the
randomized Hadamard transform, RHT), §4.1 (BlockLDLQ), §4.2 (the E8P
codebook, 2 bits) and §4.3 (residual vector quantization for 3 and 4 bits).
Fine-tuning (§5) is not done.

For W [out, in] and H [in, in]:

    H ← H + percdamp · mean(diag H) · I                 (dampening; dead columns as in GPTQ)
    W ← T_out W T_inᵀ,  H ← T_in H T_inᵀ                 (RHT: T = Had · diag(s) / √n, s random ±1;
                                                          runtime/hadamard.py, Had of order K · 2^p)
    σ = RMS(W)                                           (processed weights are close to i.i.d. N(0, σ²))
    Ŵ = BlockLDLQ(W, H) with blocks of 8 columns, each row's 8 weights
        rounded to the nearest point of σ · (s_1 · E8P)  (2 bits), then the residual
        to σ · s_2 · (1-bit E8) (3 bits) or σ · s_2 · E8P (4 bits)   (runtime/e8p_codebook.py `rvq_encode`)

The stage scales s_k are runtime/e8p_codebook.py's `STAGE_SCALES` (fitted there for
unit-variance Gaussian data, as the paper sets the codebook's scale for
RMS-normalized weights). The result is an `e8p` tensor that stores the codes,
the stage scales σ s_k (float32, the values BlockLDLQ rounded with) and the two
sign vectors, and applies T_in to the input and T_outᵀ to the output at run
time (W = T_outᵀ Ŵ T_in, runtime/formats/e8p.py's `from_incoherent`; here the
transforms of rows are the run-time kernel's fast Walsh–Hadamard transform,
runtime/kernels/e8p_numba.py `hadamard_rows`, and those of columns one dense
Hadamard factor at a time, runtime/hadamard.py `hadamard_on_columns`). BlockLDLQ is layerwise.py's `ldlq`
with block 8, its lazy batches in a Numba loop (`E8PGrid`). The Hessian's
transforms and its factorization run in float32, the QuIP# reference's default
precision (quip-sharp `incoherence_preprocess`: float64 only with `--use_fp64`);
at OPT-1.3b's fc2 (8192 inputs) float64 took twice the time and memory.
The signs come from `random_signs(in, seed)` and `random_signs(out, seed + 1)`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

import rtn
from layerwise import check_problem, damp, damping, layer_stats, ldlq, undamped_losses, zero_dead_columns
from runtime import e8p_codebook
from runtime.errors import UserError
from runtime.formats.e8p import E8PTensor
from runtime.formats.uniform import PER_ROW
from runtime.hadamard import hadamard_matrix, hadamard_on_columns, random_signs
from runtime.kernels import blockldlq_e8p_numba
from runtime.kernels.e8p_encode_numba import search_tables
from runtime.kernels.e8p_numba import hadamard_rows
from runtime.method_contract import MethodContract

BLOCK = e8p_codebook.DIM  # columns per BlockLDLQ step: one E8P vector per row


@dataclass
class QuIPSharpParams:
    bits: int = 2  # 2 (E8P), 3 (E8P + 1-bit E8) or 4 (E8P + E8P)
    seed: int = 0  # seed of the random signs (stored with the weight)
    percdamp: float = 0.01  # dampening, as a fraction of mean(diag H)

    def check(self) -> None:
        """UserError unless E8P with its residual stages has these bits."""
        e8p_codebook.check_bits(self.bits)


def rht_matrix(signs: np.ndarray) -> np.ndarray:
    """T [n, n] float64 = Had · diag(s) / √n, the matrix `fast_hadamard(x * s)` applies to each row vector
    (`quantize_codes` applies it one Hadamard factor at a time; tests compare with this dense matrix)."""
    n = signs.shape[0]
    return hadamard_matrix(n).astype(np.float64) * signs.astype(np.float64) / math.sqrt(n)


@dataclass(frozen=True)
class E8PGrid:
    """BlockLDLQ's quantizer of one block of 8 columns: each row's 8 weights to the RVQ stages of `bits` at
    the scales for data of RMS `rms` (runtime/e8p_codebook.py `rvq_encode`). `ldlq` runs its lazy batches
    in a Numba loop (runtime/kernels/blockldlq_e8p_numba.py), the rows over the cores; `__call__` is the
    same rounding in NumPy, one block at a time."""
    bits: int
    rms: float

    def __call__(self, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values [out, 8] float64, codes [stages, out, 1] uint16) of target [out, 8]."""
        codes = e8p_codebook.rvq_encode(target.astype(np.float32), self.bits, self.rms)  # one [out] array per stage
        values = e8p_codebook.rvq_decode(codes, self.bits, self.rms).astype(np.float64)  # [out, 8]
        return values, np.stack([c.astype(np.uint16) for c in codes])[:, :, None]

    def new_codes(self, n_out: int, n_in: int) -> np.ndarray:
        """The codes `ldlq` fills: [stages, out, in / 8] uint16 (`quantize_codes` casts the 1-bit stage to uint8)."""
        return np.empty((len(e8p_codebook.STAGE_SCALES[self.bits]), n_out, n_in // BLOCK), dtype=np.uint16)

    @functools.cached_property
    def kernel_tables(self) -> tuple:
        """The arguments of runtime/kernels/blockldlq_e8p_numba.py's `round_batch` that depend only on the
        grid (scales, their reciprocals, the second stage, the search tables), built once for all batches."""
        scales = e8p_codebook.stage_scales(self.bits, self.rms)
        second = {2: blockldlq_e8p_numba.NO_STAGE, 3: blockldlq_e8p_numba.ONE_BIT_STAGE,
                  4: blockldlq_e8p_numba.E8P_STAGE}[self.bits]
        one_bit = e8p_codebook.e8_1bit_codebook()  # [256, 8]
        return (np.array(scales, dtype=np.float32), np.array([1.0 / scale for scale in scales], dtype=np.float32),
                second, *search_tables(e8p_codebook.source_codebook(), e8p_codebook.source_parity()),
                np.ascontiguousarray(one_bit.T), (one_bit * one_bit).sum(axis=1))

    def round_batch(self, targets, weights, feedback, diagonal, quantized, errors, codes, losses) -> None:
        """`ldlq`'s lazy batch of blocks in runtime/kernels/blockldlq_e8p_numba.py's loop."""
        blockldlq_e8p_numba.round_batch(targets, weights, feedback, diagonal, *self.kernel_tables, quantized, errors,
                                        codes, losses)


@dataclass
class QuIPSharpResult:
    """What the algorithm chose, and the weight it stands for."""
    stage_codes: list  # one [out, in/8] array per RVQ stage (uint16 E8P, uint8 1-bit E8)
    stage_scales: list  # [stages] floats σ · s_k
    sign_in: np.ndarray  # [in] float32 ±1
    sign_out: np.ndarray  # [out] float32 ±1
    Q: np.ndarray  # [out, in] float32 T_outᵀ Ŵ T_in, the quantized weight in the original space
    row_losses: np.ndarray  # [out] float64 tr((W − Q) H (W − Q)ᵀ) per row: BlockLDLQ's own (orthogonal T keep it)


def quantize_codes(W: np.ndarray, H: np.ndarray, params: QuIPSharpParams) -> QuIPSharpResult:
    """The algorithm of the module docstring on W [out, in] with Hessian H [in, in]."""
    params.check()
    W, H = check_problem(W, H)  # [out, in] float32, [in, in] as given (float32 or float64)
    n_out, n_in = W.shape
    if n_in % BLOCK:
        raise UserError(f"quipsharp: in_features must be a multiple of {BLOCK}, got {n_in}; use quip or gptq "
                        f"for this layer")
    W0, H_damped = zero_dead_columns(W, H, dtype=np.float32)  # [out, in], [in, in] float32 copies
    lam = damping(H_damped, params.percdamp)  # λ of `damp`, for the loss under H itself
    H_damped = damp(H_damped, params.percdamp, overwrite=True)  # [in, in]
    sign_in = random_signs(n_in, params.seed)  # [in]
    sign_out = random_signs(n_out, params.seed + 1)  # [out]
    ones_in = np.ones(n_in, dtype=np.float32)  # [in]
    H_t = hadamard_rows(H_damped, n_in, sign_in, ones_in, False)  # [in, in]  H T_inᵀ
    del H_damped
    H_t *= sign_in[:, None]  # diag(s) H T_inᵀ
    H_t = hadamard_on_columns(H_t)  # [in, in]  T_in H T_inᵀ (symmetric to rounding: LDLQ reads one triangle)
    W_t = hadamard_on_columns(sign_out[:, None] * hadamard_rows(W0, n_in, sign_in, ones_in, False))  # [out, in]
    #                                                                                      T_out W T_inᵀ
    rms = max(float(np.float32(np.sqrt(np.mean(W_t ** 2, dtype=np.float64)))), 1e-12)  # σ, float32-exact as stored
    Q_t, codes, damped_losses = ldlq(W_t, H_t, E8PGrid(params.bits, rms), block=BLOCK, factor_dtype=np.float32)
    stages = e8p_codebook.stage_codebooks(params.bits)
    Q_t = Q_t.astype(np.float32)  # [out, in] exact: the codebook's float32 values
    Q = sign_out[:, None] * hadamard_on_columns(hadamard_rows(Q_t, n_in, ones_in, sign_in, True), transpose=True)
    #                                                                                       [out, in] T_outᵀ Q_t T_in
    return QuIPSharpResult(stage_codes=[codes[k].astype(stage.code_dtype) for k, stage in enumerate(stages)],
                           stage_scales=e8p_codebook.stage_scales(params.bits, rms), sign_in=sign_in, sign_out=sign_out,
                           Q=Q, row_losses=undamped_losses(damped_losses, W0, Q, H, lam))


def quantize(W: np.ndarray, H: np.ndarray, params: QuIPSharpParams = QuIPSharpParams()) -> tuple[E8PTensor, dict]:
    """W [out, in], H [in, in] -> (E8PTensor, stats): stats["loss"] the proxy loss tr((W − Q) H (W − Q)ᵀ)
    of the stored weight, stats["rtn_loss"] that of per-row RTN at the same bits, stats["ratio"] their ratio."""
    result = quantize_codes(W, H, params)
    packed = E8PTensor.from_codes(result.stage_codes, result.stage_scales, result.sign_in, result.sign_out,
                                  params.bits, W.shape)
    rtn_weight = rtn.quantize(W, rtn.RTNParams(bits=params.bits, group_size=PER_ROW)).dequantize()  # [out, in]
    return packed, layer_stats(W, rtn_weight, H, loss=float(result.row_losses.sum()))


def quantize_shared(weights: list, H: np.ndarray, params: QuIPSharpParams = QuIPSharpParams()) -> list:
    """`quantize` for several weights [out_k, in] that read the same input (one H): [(packed, stats)].

    Each weight has its own scale σ, so each is processed on its own (same seed, same input signs).
    """
    return [quantize(W, H, params) for W in weights]


CONTRACTS = (MethodContract(
    "quipsharp", "QuIP#: Hadamard incoherence + BlockLDLQ on the E8P lattice codebook", bits=(2, 3, 4),
    params=lambda spec: QuIPSharpParams(bits=spec.bits), quantize=quantize_shared, examples=("quipsharp2",),
    calibration="hessian"),)
