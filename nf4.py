"""NF4 / FP4 blockwise 4-bit quantization with optional double quantization (QLoRA).

Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023, "QLoRA: Efficient Finetuning
of Quantized LLMs", §3, following bitsandbytes' `quantize_4bit`:

1. Cut each row of W [out, in] into blocks of `block_size` weights and
   divide every block by its absmax, so it lies in [-1, 1].
2. Replace each normalized weight by the nearest of 16 table values (ties go
   to the smaller value) and store its 4-bit index:
   - NF4 ("4-bit NormalFloat", §3): quantiles of N(0, 1), so that each code
     is equally likely for normally distributed weights, with an exact zero
     (`nf4_table`).
   - FP4: the OCP MX E2M1 float (`fp4_table`).
3. Optionally ("Double Quantization", §3) quantize the fp32 absmax values
   themselves: subtract their mean, absmax-quantize runs of 256 of them to
   the signed 8-bit dynamic map. This saves 0.373 bits per weight at block
   size 64 (4.5 -> 4.127 bits).

The result is a `Lut4Tensor` (runtime/formats/lut4.py). Pure NumPy.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from runtime import fptypes
from runtime.errors import UserError
from runtime.formats.lut4 import DQ_BLOCK_SIZE, Lut4Tensor, dynamic_map, pack_nibbles
from runtime.method_contract import MethodContract, Option, QuantSpec

NF4_OFFSET = 0.9677083  # QLoRA / bitsandbytes: the outermost quantile, (1 - 1/(2*15) + 1 - 1/(2*16)) / 2
DTYPES = ("nf4", "fp4")


@dataclass
class NF4Params:
    """dtype: "nf4" or "fp4"; block_size: weights per absmax (a multiple of 8 dividing in_features);
    double_quant: quantize the absmax values too (QLoRA §3)."""

    dtype: str = "nf4"
    block_size: int = 64
    double_quant: bool = False

    def check(self) -> None:
        """UserError unless the dtype is known and the block size a positive multiple of 8."""
        if self.dtype not in DTYPES:
            raise UserError(f"nf4: unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if not isinstance(self.block_size, int) or self.block_size <= 0 or self.block_size % 8:
            raise UserError(f"nf4: block_size {self.block_size!r} must be a positive multiple of 8")


def from_tag(spec: QuantSpec) -> NF4Params:
    """The parameters a tag asks for: nf or fp, GROUP weights per absmax, dq for double quantization."""
    return NF4Params(dtype=f"{spec.method}4", block_size=spec.group_size or NF4Params.block_size,
                     double_quant="dq" in spec.options)


def nf4_table() -> np.ndarray:
    """The 16 NF4 values [16] float32, sorted, from -1 to 1 with an exact 0.

    QLoRA §3 / bitsandbytes `create_normal_map(offset=0.9677083)`: an
    asymmetric set of N(0, 1) quantiles, 8 positive ones at probabilities
    evenly spaced from `NF4_OFFSET` down to 0.5 (exclusive) and 7 negative
    ones likewise, plus 0; then divided by the largest so it spans [-1, 1].
    """
    inv_cdf = NormalDist().inv_cdf
    positive = [inv_cdf(p) for p in np.linspace(NF4_OFFSET, 0.5, 9)[:-1]]
    negative = [-inv_cdf(p) for p in np.linspace(NF4_OFFSET, 0.5, 8)[:-1]]
    values = np.sort(np.array(positive + [0.0] + negative))  # [16]
    return (values / values.max()).astype(np.float32)


def fp4_table() -> np.ndarray:
    """The 16 FP4 values [16] float32, indexed by the E2M1 bit pattern, divided by 6 to span [-1, 1].

    OCP Microscaling Formats (MX) v1.0, §5.3.3, element type E2M1 (sign,
    2 exponent bits with bias 1, 1 mantissa bit; no inf or NaN): magnitudes
    {0, 0.5, 1, 1.5, 2, 3, 4, 6}, codes 8..15 their negatives (code 8 is
    -0). bitsandbytes' "fp4" differs: its smallest magnitude is 1/192
    instead of 0.5/6 and its codes are ordered differently.
    """
    codes = np.arange(16, dtype=np.uint8)
    return fptypes.decode(codes, fptypes.FP4_E2M1) / np.float32(6.0)


def nearest_codes(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index into `table` of the value nearest to each of `values` (ties: the smaller value;
    equal table entries: the lowest index). Same shape as `values`, uint8."""
    levels, first_code = np.unique(table, return_index=True)  # sorted distinct values
    midpoints = (levels[:-1].astype(np.float64) + levels[1:]) / 2
    return first_code[np.searchsorted(midpoints, values, side="left")].astype(np.uint8)


def double_quantize(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """absmax [out, nb] float32 -> (codes [out, nb] uint8, run scales [ceil(out*nb/256)], mean [1]).

    QLoRA §3 Double Quantization: subtract the mean, then absmax-quantize
    each run of 256 values (row-major order) to the signed dynamic map.
    """
    mean = np.array([absmax.mean(dtype=np.float64)], dtype=np.float32)  # [1]
    centred = (absmax - mean[0]).ravel()  # [out*nb]
    n_runs = -(-centred.size // DQ_BLOCK_SIZE)
    runs = np.zeros(n_runs * DQ_BLOCK_SIZE, dtype=np.float32)
    runs[:centred.size] = centred
    runs = runs.reshape(n_runs, DQ_BLOCK_SIZE)  # [runs, 256]
    scale = np.abs(runs).max(axis=1)  # [runs]
    normalized = runs / np.where(scale > 0, scale, 1)[:, None]  # [runs, 256] in [-1, 1]
    codes = nearest_codes(normalized, dynamic_map()).ravel()[:centred.size]  # [out*nb]
    return codes.reshape(absmax.shape), scale.astype(np.float32), mean


def quantize(W: np.ndarray, params: NF4Params | None = None) -> Lut4Tensor:
    """W [out, in] float -> Lut4Tensor of NF4 or FP4 codes with one absmax per block (default NF4Params())."""
    params = params or NF4Params()
    params.check()
    W = np.asarray(W, dtype=np.float32)
    block = params.block_size
    if W.ndim != 2:
        raise UserError(f"nf4: expected a weight matrix [out, in], got shape {W.shape}")
    n_out, n_in = W.shape
    if n_in % block:
        raise UserError(f"nf4: in_features {n_in} is not a multiple of block_size {block}; "
                        f"pick a block size that divides it")
    if not np.isfinite(W).all():
        raise UserError("nf4: the weight contains inf or NaN; fix the checkpoint before quantizing")

    table = nf4_table() if params.dtype == "nf4" else fp4_table()  # [16]
    blocks = W.reshape(n_out, n_in // block, block)  # [out, in/B, B]
    absmax = np.abs(blocks).max(axis=2)  # [out, in/B]
    normalized = blocks / np.where(absmax > 0, absmax, 1)[:, :, None]  # [out, in/B, B] in [-1, 1]
    codes = nearest_codes(normalized, table).reshape(n_out, n_in)  # [out, in]
    qweight = pack_nibbles(codes)  # [out, in/2]
    if not params.double_quant:
        return Lut4Tensor(qweight, table, block, absmax=absmax)
    absmax_q, absmax_scale, absmax_mean = double_quantize(absmax)
    return Lut4Tensor(qweight, table, block, absmax_q=absmax_q, absmax_scale=absmax_scale,
                      absmax_mean=absmax_mean)


DOUBLE_QUANT = Option("dq", "--dq", "double quantization of the block scales")
CONTRACTS = (
    MethodContract("nf", "NF4 of QLoRA: 4-bit NormalFloat codes, absmax per block", bits=(4,), params=from_tag,
                   quantize=quantize, examples=("nf4", "nf4dq", "nf4g128"), options=(DOUBLE_QUANT,),
                   group_multiple=8, group_field="block_size"),
    MethodContract("fp", "FP4 (E2M1) codes, absmax per block", bits=(4,), params=from_tag, quantize=quantize,
                   examples=("fp4",), options=(DOUBLE_QUANT,), group_multiple=8, group_field="block_size"),
)
