"""Quantize every linear layer of a checkpoint with a method and save the packed model.

The driver behind `quantize.py` and behind `run.py --model BASE.TAG` when the
quantized model is not built yet. Every decoder projection (Llama: q, k, v,
o, gate, up, down; OPT: q, k, v, out_proj, fc1, fc2) goes through the
method. As llama.cpp does for this project's default model (its Q4_1 file
keeps `token_embd` at Q8_0), the LM head is kept at 8 bits (per-row
round-to-nearest) and the token embedding in float16, whatever the method.
The output directory is written under a temporary name and renamed at the
end, so an interrupted run leaves no half-written model. Methods that need
calibration data (`CALIBRATED`: gptq) run through runtime/calibration.py,
layer by layer, with their state kept in `<out_dir>.partial/` for `resume`.
"""
from __future__ import annotations

import dataclasses
import math
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm


from model import Config
from runtime.atomic import atomic_directory
from runtime.calibration import CalibrationSettings, calibrate, sample_windows, settings_record, state_dir_for, \
    text_tokens
from runtime.checkpoint import load_checkpoint
from runtime.lora import load_adapter, merge_lora
from runtime.packed_checkpoint import save_packed
from runtime.resolve import MODELS_DIR, find_model, resolve_model
from runtime.tags import QuantSpec, parse_tag
from runtime.tokenizer import Tokenizer

PROJECTIONS = {"llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
               "opt": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "fc1", "fc2")}
HEAD_SPEC = QuantSpec("rtn", 8, 0, {"sym"})


def projection_names(config: Config) -> list[str]:
    """Checkpoint names of every decoder projection weight, layer by layer."""
    prefix = "model.decoder.layers" if config.arch == "opt" else "model.layers"
    return [f"{prefix}.{i}.{p}.weight" for i in range(config.n_layers) for p in PROJECTIONS[config.arch]]


def rtn_quantize(weight: np.ndarray, spec: QuantSpec):
    """Round-to-nearest with the settings of `spec`."""
    import rtn
    params = rtn.RTNParams(bits=spec.bits, group_size=spec.group_size, sym="sym" in spec.options,
                           mse_clip="mse" in spec.options, per_tensor="tensor" in spec.options)
    return rtn.quantize(np.asarray(weight, dtype=np.float32), params)


def lut4_quantize(weight: np.ndarray, spec: QuantSpec):
    """NF4 or FP4 blockwise (QLoRA) with the settings of `spec`; blocks of 64 unless a group is given."""
    import nf4
    params = nf4.NF4Params(dtype=f"{spec.method}4", block_size=spec.group_size or nf4.NF4Params.block_size,
                           double_quant="dq" in spec.options)
    return nf4.quantize(np.asarray(weight, dtype=np.float32), params)


def gptq_method(spec: QuantSpec):
    """GPTQ with the settings of `spec`, as a calibration method: (names, weights, H) -> [(packed, stats)]."""
    import gptq
    params = gptq.GPTQParams(bits=spec.bits, group_size=spec.group_size, sym="sym" in spec.options,
                             act_order="act" in spec.options, static_groups="static" in spec.options)
    return lambda names, weights, hessian: gptq.quantize_shared(weights, hessian, params)


def spqr_method(spec: QuantSpec):
    """SpQR with the settings of `spec` (group 16, 3-bit statistics, tau 0.2 unless the tag says otherwise)."""
    import spqr
    threshold = math.inf if "dense" in spec.options else spec.values.get("t", 20) / 100
    params = spqr.SpQRParams(bits=spec.bits, group_size=spec.group_size or spqr.SpQRParams.group_size,
                             outlier_threshold=threshold, stat_bits=spec.values.get("s", spqr.SpQRParams.stat_bits))
    return lambda names, weights, hessian: spqr.quantize_shared(weights, hessian, params)


def quip_method(spec: QuantSpec):
    """QuIP (incoherence processing + LDLQ on the uniform grid) at `spec.bits`."""
    import quip
    params = quip.QuIPParams(bits=spec.bits)
    return lambda names, weights, hessian: quip.quantize_shared(weights, hessian, params)


def quipsharp_method(spec: QuantSpec):
    """QuIP# (randomized Hadamard transform + BlockLDLQ on E8P, residual stages above 2 bits) at `spec.bits`."""
    import quipsharp
    params = quipsharp.QuIPSharpParams(bits=spec.bits)
    return lambda names, weights, hessian: quipsharp.quantize_shared(weights, hessian, params)


def int8_quantize(weight: np.ndarray, spec: QuantSpec):
    """LLM.int8 (int8; int8tN: outlier threshold N/100), naive absmax W8A8 (absmax8) or the W8A8 of
    SmoothQuant on smoothed weights (smooth8)."""
    import int8
    params = {"int": int8.LLM_INT8, "absmax": int8.ABSMAX8, "smooth": int8.SMOOTH8}[spec.method]
    if "t" in spec.values:
        params = dataclasses.replace(params, outlier_threshold=spec.values["t"] / 100)
    return int8.quantize(np.asarray(weight, dtype=np.float32), params)


METHODS = {"rtn": rtn_quantize, "nf": lut4_quantize, "fp": lut4_quantize, "int": int8_quantize,
           "absmax": int8_quantize, "smooth": int8_quantize}
CALIBRATED = {"gptq": gptq_method, "spqr": spqr_method, "quip": quip_method, "quipsharp": quipsharp_method}


def quantize_tensors(config: Config, tensors: dict, spec: QuantSpec, progress: bool = True,
                     projections: dict | None = None) -> dict:
    """The model's tensors with projections packed by the method (or taken from `projections`, already
    packed), head at 8 bits, embedding in float16."""
    names = projection_names(config)
    out = {name: value for name, value in tensors.items() if name not in names}
    if projections is not None:
        out.update(projections)
    else:
        for name in tqdm(names, desc=f"quantizing {spec.tag}", unit="linear", disable=not progress):
            out[name] = METHODS[spec.method](tensors[name], spec)
    embed_name = "model.decoder.embed_tokens.weight" if config.arch == "opt" else "model.embed_tokens.weight"
    out["lm_head.weight"] = rtn_quantize(tensors.get("lm_head.weight", tensors[embed_name]), HEAD_SPEC)
    out[embed_name] = np.asarray(tensors[embed_name], dtype=np.float16)
    return out


def copy_tokenizer(base: Path, directory: Path) -> None:
    """The base model's tokenizer, saved into `directory`."""
    Tokenizer.load(base).save(directory)


def calibrate_projections(base: Path, config: Config, tensors: dict, spec: QuantSpec, out_dir: Path,
                          calibration: CalibrationSettings, resume: bool, progress: bool) -> tuple[dict, dict]:
    """(packed projections, summary for config.json) of a calibrated method, on the base's tokenizer."""
    windows = sample_windows(text_tokens(Tokenizer.load(base), calibration.text), calibration.nsamples,
                             calibration.seqlen, calibration.seed)  # [nsamples, seqlen]
    record = settings_record(calibration)
    settings = dict(record, tag=spec.tag, base=str(Path(base).resolve()))
    packed, stats = calibrate(config, tensors, CALIBRATED[spec.method](spec), windows, state_dir_for(out_dir),
                              settings, resume, progress, tqdm.write if progress else None)
    return packed, {"calibration": record, "proxy_loss": summarize_stats(stats)}


def summarize_stats(stats: dict) -> dict:
    """The per-linear stats of a calibrated method summed over the model (losses, outlier counts), with the
    mean and max of the per-linear ratio to RTN's loss."""
    keys = sorted({k for s in stats.values() for k in s} - {"ratio", "bits"})
    ratios = [s["ratio"] for s in stats.values()]
    return {**{k: sum(s.get(k, 0) for s in stats.values()) for k in keys}, "ratio_mean": sum(ratios) / len(ratios),
            "ratio_max": max(ratios), "linears": len(ratios)}


def bits_per_weight(config: Config, packed: dict) -> float:
    """Average stored bits per weight of the decoder projections: codes and all side data, from the bytes."""
    weights = [packed[name] for name in projection_names(config)]
    return sum(8 * w.nbytes for w in weights) / sum(int(np.prod(w.shape)) for w in weights)


def smooth(base: Path, config: Config, tensors: dict) -> tuple[dict, dict]:
    """SmoothQuant's offline step: per-channel activation maxima from calibration text, folded into
    the norms and the linears that follow them; (smoothed tensors, summary for config.json)."""
    import int8
    from runtime import smoothing
    sequences = smoothing.calibration_sequences(Tokenizer.load(base))
    smoothed = smoothing.smooth_model(config, tensors, sequences, int8.SMOOTHQUANT_ALPHA)
    return smoothed, {"smoothing": {"alpha": int8.SMOOTHQUANT_ALPHA, "sequences": len(sequences),
                                    "length": len(sequences[0])}}


def build_quantized(base: Path, spec: QuantSpec, out_dir: Path, progress: bool = True,
                    calibration: CalibrationSettings | None = None, resume: bool = False,
                    lora: Path | None = None) -> Path:
    """Quantize the checkpoint at `base` as `spec` says and write it to `out_dir`, atomically.

    A calibrated method (gptq) draws its data as `calibration` says (default settings when None)
    and continues a run interrupted with the same settings when `resume`. A PEFT adapter
    directory `lora` is merged into the float weights first.
    """
    hf_config, tensors = load_checkpoint(base)
    if lora is not None:
        tensors = merge_lora(tensors, load_adapter(lora))
    config = Config.from_hf(hf_config)
    start = time.perf_counter()
    projections, extra = None, {}
    if spec.method == "smooth":
        tensors, extra = smooth(base, config, tensors)
    if spec.method in CALIBRATED:
        projections, extra = calibrate_projections(base, config, tensors, spec, out_dir,
                                                   calibration or CalibrationSettings(), resume, progress)
    packed = quantize_tensors(config, tensors, spec, progress, projections)
    hf_config = dict(hf_config, quantization={
        "method": spec.method, "bits": spec.bits, "group_size": spec.group_size,
        "options": sorted(spec.options), **({"values": spec.values} if spec.values else {}),
        "tag": spec.tag, "base": str(base),
        "lm_head": HEAD_SPEC.tag, "embed_tokens": "float16",
        "bits_per_weight": round(bits_per_weight(config, packed), 4), **extra,
        **({"lora_merged": str(lora)} if lora is not None else {}),
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})  # Linux: KiB
    with atomic_directory(out_dir) as tmp:
        save_packed(tmp, hf_config, packed)
        copy_tokenizer(base, tmp)
    shutil.rmtree(state_dir_for(out_dir), ignore_errors=True)
    return out_dir


def split_quantized_name(name: str) -> tuple[str, str] | None:
    """("smollm2-135m", "rtn4g128") for "smollm2-135m.rtn4g128"; None when there is no tag."""
    base, dot, tag = name.rpartition(".")
    return (base, tag) if dot and base and tag and "/" not in tag else None


def find_or_build(name: str | None, progress: bool = True) -> Path:
    """The checkpoint `name` stands for; a BASE.TAG that does not exist yet is built from BASE."""
    path = find_model(name)
    if path is not None:
        return path
    parts = split_quantized_name(name or "")
    base_path = find_model(parts[0]) if parts else None
    if base_path is None:
        return resolve_model(name)  # raises the error that says what to do
    base, tag = parts
    spec = parse_tag(tag)
    out_dir = MODELS_DIR / f"{Path(base).name}.{spec.tag}"
    if (out_dir / "config.json").is_file():
        return out_dir
    if progress:
        print(f"{name} is not built yet: quantizing {base_path} with {spec.tag} ...", file=sys.stderr, flush=True)
    return build_quantized(base_path, spec, out_dir, progress)
