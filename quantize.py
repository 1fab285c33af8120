"""Quantize a checkpoint with a method and save it: `python quantize.py --model BASE --method rtn --bits 4 --group 128`.

Writes models/BASE.TAG/ (config.json with a `quantization` section,
model.safetensors with the packed tensors, tokenizer files) atomically; the
tag grammar is in runtime/tags.py and the README.
"""
import argparse
from pathlib import Path

from runtime.cli import run_cli
from runtime.tags import METHOD_BITS, QuantSpec, parse_tag


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="base checkpoint: name under models/, directory or file")
    p.add_argument("--method", default="rtn", choices=sorted(METHOD_BITS))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=128, help="input columns per scale; 0 = one scale per row")
    p.add_argument("--sym", action="store_true", help="symmetric grid (no zero point)")
    p.add_argument("--mse", action="store_true", help="MSE-optimal clipping search")
    p.add_argument("--per-tensor", action="store_true", help="one scale for the whole tensor")
    p.add_argument("--out", type=Path, default=None, help="output directory (default models/BASE.TAG)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from runtime.quantize_model import build_quantized
    from runtime.resolve import DEFAULT_MODEL, MODELS_DIR, resolve_model
    options = {o for o, on in (("sym", args.sym), ("mse", args.mse), ("tensor", args.per_tensor)) if on}
    spec = QuantSpec(args.method, args.bits, 0 if args.per_tensor else args.group, options)
    spec = parse_tag(spec.tag)  # the same checks as a tag typed by hand
    base = resolve_model(args.model)
    out = args.out or MODELS_DIR / f"{Path(args.model or DEFAULT_MODEL).name}.{spec.tag}"
    build_quantized(base, spec, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
