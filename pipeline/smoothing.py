"""SmoothQuant's offline part: activation statistics from calibration text, factors folded into the model.

Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", §4. For every group of linears that
read the output of one norm, the factors s = `int8.smoothing_factors` (from
max|X_j| over calibration tokens and max|W_j| over the group's weights) are
folded in exactly, as the authors' reference code does:

    norm weight (and OPT's norm bias) /= s        so the norm emits X diag(s)^-1
    W[:, j] *= s_j  for each linear of the group  so X Wᵀ is unchanged

    Llama: input_layernorm          -> self_attn.q_proj, k_proj, v_proj
           post_attention_layernorm -> mlp.gate_proj, up_proj
    OPT:   self_attn_layer_norm     -> self_attn.q_proj, k_proj, v_proj
           final_layer_norm         -> fc1

o_proj / out_proj, down_proj and fc2 have no norm in front that could absorb
the division and stay unsmoothed (as in the reference code for both
families). OPT models with post-LN layers (`do_layer_norm_before` false,
e.g. opt-350m) have no norm in front of any linear: UserError.

The statistics are collected by running the float model over token
sequences with every smoothed weight swapped for a `_Recorder`, which
`runtime.linear.linear` calls through `matmul` like any packed weight.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from int8 import SMOOTHQUANT_ALPHA, smoothing_factors
from model import Config, Model
from runtime.text.datasets import CALIBRATION_TEXT, read_text
from runtime.errors import UserError

GROUPS = {"llama": (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
          "opt": (("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                  ("final_layer_norm", ("fc1",)))}
CALIBRATION_SEQUENCES = 8  # sequences of calibration text (the SmoothQuant reference uses 512 of the Pile)
CALIBRATION_LENGTH = 512  # tokens per sequence
CHARS_PER_TOKEN = 8  # generous: read this many characters of text per token wanted


class _Recorder:
    """Stands in for a float weight [out, in]: multiplies like it, keeps max |x_j| per input channel j."""

    def __init__(self, weight: np.ndarray):
        self.weight = weight  # [out, in]
        self.absmax = np.zeros(weight.shape[1], dtype=np.float32)  # [in]

    def matmul(self, x):
        """x [..., in] @ W.T, recording the largest |x| of every input channel."""
        rows = x.reshape(-1, x.shape[-1])  # [m, in]
        np.maximum(self.absmax, np.abs(rows).max(axis=0), out=self.absmax)
        return x @ self.weight.T  # [..., out]


def _layer_prefix(config: Config, i: int) -> str:
    return f"model.decoder.layers.{i}." if config.arch == "opt" else f"model.layers.{i}."


def _check_smoothable(config: Config) -> None:
    if config.arch == "opt" and not config.pre_norm:
        raise UserError("smoothquant: this OPT model applies its layer norms after attention and FFN "
                        "(do_layer_norm_before is false), so no norm can absorb the smoothing; use int8")


def activation_absmax(config: Config, tensors: dict, token_sequences) -> dict[str, np.ndarray]:
    """max |X_j| [in] per smoothed linear (checkpoint weight name), over all tokens of all sequences."""
    _check_smoothable(config)
    recorders = {}
    for i in range(config.n_layers):
        for _, linears in GROUPS[config.arch]:
            for linear_name in linears:
                name = f"{_layer_prefix(config, i)}{linear_name}.weight"
                recorders[name] = _Recorder(tensors[name])
    model = Model(config, {**tensors, **recorders})
    for sequence in token_sequences:
        sequence = np.asarray(sequence, dtype=np.int64)  # [T]
        if not 0 < len(sequence) <= config.max_positions:
            raise UserError(f"smoothquant: a calibration sequence has {len(sequence)} tokens; the model "
                            f"takes 1 to {config.max_positions}: use shorter sequences")
        model.prefill(sequence, model.new_cache(len(sequence)))
    return {name: recorder.absmax for name, recorder in recorders.items()}


def smooth_model(config: Config, tensors: dict, token_sequences, alpha: float = SMOOTHQUANT_ALPHA) -> dict:
    """A copy of `tensors` with the SmoothQuant factors folded into norms and linears (float32).

    token_sequences: iterable of token-id arrays run through the float model
    for the statistics (`calibration_sequences` reads the default text).
    The smoothed model computes the same function up to float32 rounding.
    """
    act = activation_absmax(config, tensors, token_sequences)
    out = dict(tensors)
    for i in range(config.n_layers):
        prefix = _layer_prefix(config, i)
        for norm, linears in GROUPS[config.arch]:
            names = [f"{prefix}{linear}.weight" for linear in linears]
            act_absmax = np.max([act[name] for name in names], axis=0)  # [in]: the linears share their input
            weight_absmax = np.max([np.abs(tensors[name]).max(axis=0) for name in names], axis=0)  # [in]
            s = smoothing_factors(act_absmax, weight_absmax, alpha)  # [in]
            for name in names:
                out[name] = np.asarray(tensors[name], dtype=np.float32) * s[None, :]  # [out, in]
            for part in ("weight", "bias"):
                key = f"{prefix}{norm}.{part}"
                if key in tensors:
                    out[key] = np.asarray(tensors[key], dtype=np.float32) / s  # [in]
    return out


def calibration_sequences(tokenizer, n_sequences: int = CALIBRATION_SEQUENCES,
                          length: int = CALIBRATION_LENGTH, path: Path = CALIBRATION_TEXT) -> list[np.ndarray]:
    """`n_sequences` consecutive runs of `length` token ids [length] from the start of the calibration text."""
    wanted = n_sequences * length
    text = read_text(path)
    ids = np.asarray(tokenizer.encode(text[:wanted * CHARS_PER_TOKEN], add_bos=False), dtype=np.int64)
    if len(ids) < wanted:
        ids = np.asarray(tokenizer.encode(text, add_bos=False), dtype=np.int64)
    if len(ids) < wanted:
        raise UserError(f"calibration text {path} gives {len(ids)} tokens, fewer than the {wanted} wanted: "
                        f"ask for fewer or shorter sequences")
    return [ids[k * length:(k + 1) * length] for k in range(n_sequences)]
