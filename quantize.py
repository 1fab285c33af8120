"""Quantize a checkpoint with a method and save it: `python quantize.py --model BASE --method rtn --bits 4 --group 128`.

Writes models/BASE.TAG/ (config.json with a `quantization` section,
model.safetensors with the packed tensors, tokenizer files) atomically; the
tag grammar is in runtime/tags.py and the README. Everything the build needs
(options, tokenizer, calibration text, output location, group sizes) is
checked before the work starts; `--out` never removes anything a build did
not write (runtime/quantize_model.py: check_output).
"""
import argparse
import json
import math
from pathlib import Path

from runtime.cli import run_cli
from runtime.errors import UserError
from runtime.tags import METHOD_BITS, QuantSpec, parse_tag


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="base checkpoint: name under models/, directory, file, or a "
                   "Hugging Face Hub model (org/name[@revision], or a short name such as opt-1.3b)")
    p.add_argument("--method", default="rtn", choices=sorted(METHOD_BITS))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=None,
                   help="weights per scale (rtn/gptq: multiple of 32, absent or 0: one per row; nf/fp: default 64; "
                        "spqr: multiple of 16, default 16)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (no zero point)")
    p.add_argument("--mse", action="store_true", help="MSE-optimal clipping search")
    p.add_argument("--per-tensor", action="store_true", help="one scale for the whole tensor")
    p.add_argument("--dq", action="store_true", help="nf/fp: double quantization of the block scales")
    p.add_argument("--act-order", action="store_true",
                   help="gptq: quantize columns by descending Hessian diagonal")
    p.add_argument("--stat-bits", type=int, default=None,
                   help="spqr: bits of the quantized group statistics (default 3; 16 keeps them in fp16)")
    p.add_argument("--outlier-threshold", type=float, default=None,
                   help="spqr: outlier sensitivity threshold tau, in steps of 0.01 (default 0.2)")
    p.add_argument("--no-outliers", action="store_true", help="spqr: keep no outliers (tau = infinity)")
    p.add_argument("--calib", type=Path, default=None,
                   help="gptq: calibration text file (default: WikiText-2 validation tokens)")
    p.add_argument("--nsamples", type=int, default=None, help="gptq: calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=None, help="gptq: tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, default=None, help="gptq: seed of the window offsets (default 0)")
    p.add_argument("--resume", action="store_true",
                   help="gptq: continue an interrupted run from OUT.partial/ (same settings required)")
    p.add_argument("--lora", type=Path, default=None,
                   help="PEFT LoRA adapter to merge into the float weights before quantizing (needs --out)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default models/BASE.TAG); it must not exist yet, be empty, or hold a "
                        "model quantize.py wrote (replaced only with --overwrite); never the base model, the "
                        "current directory, the project, the models directory or a parent of them")
    p.add_argument("--export", choices=("gptq", "gguf"), default=None,
                   help="also write the model as a GPTQ checkpoint (transformers) or a GGUF file (llama.cpp); a model "
                        "already built with these settings is exported as it is (runtime/export/)")
    p.add_argument("--export-out", type=Path, default=None,
                   help="where --export writes (default: OUT-gptq/ or OUT.gguf beside the model)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model quantize.py wrote at OUT, once the new one is complete (a directory "
                        "holding anything else is still refused)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from runtime.calibration import CalibrationSettings
    from runtime.quantize_model import CALIBRATED, build_quantized
    from runtime.resolve import DEFAULT_MODEL, MODELS_DIR, base_dir_name, resolve_model
    options = {o for o, on in (("sym", args.sym), ("mse", args.mse), ("tensor", args.per_tensor),
                               ("act", args.act_order), ("dq", args.dq), ("dense", args.no_outliers)) if on}
    values = {}
    if args.stat_bits is not None:
        values["s"] = args.stat_bits
    if args.outlier_threshold is not None:
        if not math.isfinite(args.outlier_threshold):
            raise UserError(f"--outlier-threshold {args.outlier_threshold}: give a finite positive multiple of 0.01 "
                            f"(e.g. 0.2), or --no-outliers for no outliers")
        percent = round(args.outlier_threshold * 100)
        if percent <= 0 or abs(percent - args.outlier_threshold * 100) > 1e-6:
            raise UserError(f"--outlier-threshold {args.outlier_threshold}: give a positive multiple of 0.01 "
                            f"(e.g. 0.2), or --no-outliers")
        values["t"] = percent
    spec = QuantSpec(args.method, args.bits, 0 if args.per_tensor else args.group or 0, options, values)
    spec = parse_tag(spec.tag)  # the same checks as a tag typed by hand
    base = resolve_model(args.model)
    if args.lora and not args.out:
        raise UserError("--lora merges an adapter into the model: name the result with --out DIR")
    out = args.out or MODELS_DIR / f"{base_dir_name(args.model or DEFAULT_MODEL)}.{spec.tag}"
    given = {k: v for k, v in (("text", args.calib), ("nsamples", args.nsamples), ("seqlen", args.seqlen),
                               ("seed", args.seed)) if v is not None}
    if (given or args.resume) and args.method not in CALIBRATED:
        raise UserError(f"--calib, --nsamples, --seqlen, --seed and --resume apply to calibrated methods "
                        f"({', '.join(CALIBRATED)}), not to {args.method}: drop them")
    calibration = CalibrationSettings(**given)
    from runtime.export import check_destination, default_destination, export_model
    from runtime.quantize_model import built_as
    if args.export:  # checked before the build, which can take minutes
        check_destination(args.export_out or default_destination(out, args.export))
    if not (args.export and not args.overwrite and built_as(out, {"tag": spec.tag, "base": str(base.resolve())})):
        build_quantized(base, spec, out, calibration=calibration, resume=args.resume, lora=args.lora,
                        overwrite=args.overwrite)
    bits = json.loads((out / "config.json").read_text())["quantization"]["bits_per_weight"]
    print(f"wrote {out}: {bits:.3f} bits per weight in the decoder projections (codes and side data)")
    if args.export:
        print(f"exported {export_model(out, args.export, args.export_out)} ({args.export})")


if __name__ == "__main__":
    run_cli(main)
