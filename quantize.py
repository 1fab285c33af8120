"""Quantize a checkpoint with a method and save it: `python quantize.py --model BASE --method rtn --bits 4 --group 128`.

Writes models/BASE.TAG/ (config.json with a `quantization` section,
model.safetensors with the packed tensors, tokenizer files) atomically; the
tag grammar is in pipeline/tags.py, each method's options and defaults in its own file
(CONTRACTS), which this help lists. Everything the build needs
(options, tokenizer, calibration text, output location, group sizes) is
checked before the work starts; `--out` never removes anything a build did
not write (pipeline/quantize_model.py: check_output).
"""
import argparse
import json
import math
from pathlib import Path

import runtime

runtime.blas_on_every_core()  # calibration's forward passes and Hessian math (runtime/__init__.py)

from runtime.cli import run_cli
from runtime.errors import UserError
from pipeline.tags import contracts, parse_tag
from runtime.method_contract import Option


def flag_options() -> dict:
    """{flag: [(method contract, its Option)]}: every option of every method, by quantize.py's flag."""
    flags = {}
    for contract in contracts().values():
        for option in contract.options:
            flags.setdefault(option.flag, []).append((contract, option))
    return flags


def option_help(users: list) -> str:
    """The help of one flag: each method's own words, with the default its declaration gives."""
    return "; ".join(f"{contract.name}: {option.help}"
                     + (f" (default {getattr(contract.defaults(), option.field)})" if option.field else "")
                     for contract, option in users)


def tag_number(flag: str, option: Option, value: float) -> int:
    """The number a tag writes for `flag VALUE`: VALUE * scale; UserError unless a positive whole one."""
    number = value * option.scale
    if not (math.isfinite(number) and number > 0 and abs(number - round(number)) <= 1e-6):
        raise UserError(f"{flag} {value}: give a finite positive multiple of {1 / option.scale:g}")
    return round(number)


def parse_args(argv=None) -> argparse.Namespace:
    known = contracts()
    calibrated = ", ".join(c.name for c in known.values() if c.calibration == "hessian")
    groups = "; ".join(f"{c.name}: a multiple of {c.group_multiple}, default "
                       f"{getattr(c.defaults(), c.group_field) or 'one per row'}"
                       for c in known.values() if c.group_multiple)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="base checkpoint: name under models/, directory, file, or a "
                   "Hugging Face Hub model (org/name[@revision], or a short name such as opt-1.3b)")
    p.add_argument("--method", default="rtn", choices=sorted(known),
                   help="; ".join(f"{c.name}: {c.summary}" for c in known.values()))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=None, help=f"weights per scale ({groups})")
    for flag, users in flag_options().items():
        option = users[0][1]
        if option.scale:
            p.add_argument(flag, type=float if option.scale > 1 else int, default=None, help=option_help(users))
        else:
            p.add_argument(flag, action="store_true", help=option_help(users))
    p.add_argument("--calib", type=Path, default=None,
                   help=f"{calibrated}: calibration text file (default: WikiText-2 validation tokens)")
    p.add_argument("--nsamples", type=int, default=None, help=f"{calibrated}: calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=None,
                   help=f"{calibrated}: tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, default=None, help=f"{calibrated}: seed of the window offsets (default 0)")
    p.add_argument("--resume", action="store_true",
                   help=f"{calibrated}: continue an interrupted run from OUT.partial/ (same settings required)")
    p.add_argument("--lora", type=Path, default=None,
                   help="PEFT LoRA adapter to merge into the float weights before quantizing (needs --out)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default models/BASE.TAG); it must not exist yet, be empty, or hold a "
                        "model quantize.py wrote (replaced only with --overwrite); never the base model, the "
                        "current directory, the project, the models directory or a parent of them")
    p.add_argument("--export", choices=("gptq", "gguf"), default=None,
                   help="also write the model as a GPTQ checkpoint (transformers) or a GGUF file (llama.cpp); a model "
                        "already built with these settings is exported as it is (runtime/checkpoints/export/)")
    p.add_argument("--export-out", type=Path, default=None,
                   help="where --export writes (default: OUT-gptq/ or OUT.gguf beside the model)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model quantize.py wrote at OUT, once the new one is complete (a directory "
                        "holding anything else is still refused)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from pipeline.calibration import CalibrationSettings
    from pipeline.quantize_model import build_quantized
    from runtime.hub.resolve import DEFAULT_MODEL, MODELS_DIR, base_dir_name, resolve_model
    options, values = set(), {}
    for flag, users in flag_options().items():
        option, given = users[0][1], getattr(args, flag[2:].replace("-", "_"))
        if option.scale and given is not None:
            values[option.name] = tag_number(flag, option, given)
        elif not option.scale and given:
            options.add(option.name)
    spec = contracts()[args.method].spec(args.bits, args.group or 0, options, values)
    spec = parse_tag(spec.tag)  # the same checks as a tag typed by hand
    base = resolve_model(args.model)
    if args.lora and not args.out:
        raise UserError("--lora merges an adapter into the model: name the result with --out DIR")
    out = args.out or MODELS_DIR / f"{base_dir_name(args.model or DEFAULT_MODEL)}.{spec.tag}"
    given = {k: v for k, v in (("text", args.calib), ("nsamples", args.nsamples), ("seqlen", args.seqlen),
                               ("seed", args.seed)) if v is not None}
    if (given or args.resume) and contracts()[args.method].calibration != "hessian":
        calibrated = ", ".join(c.name for c in contracts().values() if c.calibration == "hessian")
        raise UserError(f"--calib, --nsamples, --seqlen, --seed and --resume apply to calibrated methods "
                        f"({calibrated}), not to {args.method}: drop them")
    calibration = CalibrationSettings(**given)
    from runtime.checkpoints.export import check_destination, default_destination, export_model
    from pipeline.quantize_model import built_as
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
