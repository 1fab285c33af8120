"""Round-to-nearest (RTN) weight quantization onto the uniform grid.

The baseline of GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", §5 "RTN") and of
Dettmers & Zettlemoyer 2023 ("The case for 4-bit precision: k-bit Inference
Scaling Laws", §3): each weight is rounded to the nearest point of a uniform
b-bit grid, with one scale and integer zero point per group of `group_size`
input columns of a row, per row, or per tensor. No calibration data.

Each group of each output row gets the grid of `runtime.quant_grid.find_grid`:
its range [min, max] widened to contain 0 (asymmetric), or [-m, m] with
m = max |w| (symmetric); `mse_clip` shrinks the range by a grid search that
minimises sum |w - w_q|**2.4 (GPTQ's reference quantizer; Nagel et al. 2021,
"A White Paper on Neural Network Quantization", §3.4). Without clipping,
every weight is within scale / 2 of its quantized value.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import UserError
from runtime.formats.uniform import PER_ROW, UniformTensor, check_params
from runtime.quant_grid import find_grid, quantize_to_grid
from runtime.method_contract import MethodContract, Option, QuantSpec


@dataclass
class RTNParams:
    bits: int = 4  # 2, 3, 4 or 8
    group_size: int = 128  # input columns per scale (a multiple of 32); 0 or -1: one scale per row
    per_tensor: bool = False  # one scale and zero for the whole tensor (overrides group_size)
    sym: bool = False  # zero point fixed at 2**(bits-1)
    mse_clip: bool = False  # shrink each group's range to minimise the 2.4-norm error

    @property
    def groups(self) -> int:
        """The group size the format stores: PER_ROW for one group per row or per tensor."""
        return PER_ROW if self.per_tensor or self.group_size in (0, PER_ROW) else self.group_size

    def check(self) -> None:
        """UserError unless the uniform format stores these bits and groups."""
        check_params(self.bits, self.groups)


def from_tag(spec: QuantSpec) -> RTNParams:
    """The parameters a tag asks for: absent group, one per row."""
    if spec.group_size and "tensor" in spec.options:
        raise UserError(f"tag {spec.tag!r}: a group size and 'tensor' exclude each other")
    return RTNParams(bits=spec.bits, group_size=spec.group_size, sym="sym" in spec.options,
                     mse_clip="mse" in spec.options, per_tensor="tensor" in spec.options)


def quantize(W: np.ndarray, params: RTNParams = RTNParams()) -> UniformTensor:
    """W [out, in] float -> UniformTensor with every weight rounded to its group's grid."""
    params.check()
    W = np.asarray(W, dtype=np.float32)  # [out, in]
    if W.ndim != 2 or 0 in W.shape:
        raise UserError(f"rtn: the weight must be a non-empty 2-D array [out, in], got shape {list(W.shape)}")
    n_out, n_in = W.shape
    group_size = params.groups
    if params.per_tensor:
        scale, zero = find_grid(W.reshape(1, -1), params.bits, params.sym, params.mse_clip)  # [1], [1]
        scales = np.full((1, n_out), scale[0], dtype=np.float32)  # [1, out]
        zeros = np.full((1, n_out), zero[0], dtype=np.int32)  # [1, out]
        codes = quantize_to_grid(W, scales[0], zeros[0], params.bits)  # [out, in]
    else:
        width = n_in if group_size == PER_ROW else group_size
        n_groups = -(-n_in // width)
        scales = np.empty((n_groups, n_out), dtype=np.float32)  # [n_groups, out]
        zeros = np.empty((n_groups, n_out), dtype=np.int32)  # [n_groups, out]
        codes = np.empty((n_out, n_in), dtype=np.uint8)  # [out, in]
        for g in range(n_groups):
            block = W[:, g * width:(g + 1) * width]  # [out, width]
            scales[g], zeros[g] = find_grid(block, params.bits, params.sym, params.mse_clip)
            codes[:, g * width:(g + 1) * width] = quantize_to_grid(block, scales[g], zeros[g], params.bits)
    return UniformTensor.from_codes(codes, scales, zeros, bits=params.bits, group_size=group_size,
                                    sym=params.sym, per_tensor=params.per_tensor)


CONTRACTS = (MethodContract(
    "rtn", "round-to-nearest, no calibration", bits=(2, 3, 4, 8), params=from_tag, quantize=quantize,
    examples=("rtn4g128", "rtn4", "rtn3g64sym", "rtn2g64mse", "rtn8tensor"),
    options=(Option("sym", "--sym", "symmetric grid (no zero point)"),
             Option("mse", "--mse", "MSE-optimal clipping search"),
             Option("tensor", "--per-tensor", "one scale for the whole tensor")),
    group_multiple=32, group_field="group_size"),)
