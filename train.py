"""Fine-tune a LoRA adapter on a frozen float or quantized base (QLoRA): `python train.py --model M --data F --out D`.

QLoRA (Dettmers et al. 2023) trains LoRA adapters (Hu et al. 2021) through a
frozen base kept in NF4 (`smollm2-135m.nf4dq`) or any other packed format, with
AdamW (Loshchilov & Hutter 2019). The data is a plain text file (loss on every
token) or a JSONL file of {"prompt", "response"} / {"messages"} records (loss
on the response only); see pipeline/training/. On a quantized base, `--init
loftq` or `--init cloq` starts the adapter from factors that cancel the base's
quantization error (pipeline/training/compensation.py). DIR receives the PEFT adapter
(adapter_config.json + adapter_model.safetensors, for `run.py --lora DIR` and
PEFT) and DIR/checkpoint, written every --save-every steps, which `--resume`
continues from, bit-identically. Bad input gets a one-line error, exit status 1.
"""
import argparse
import math
from functools import partial
from pathlib import Path

import runtime

runtime.blas_on_every_core()  # training multiplies whole matrices (runtime/__init__.py); before NumPy loads

from pipeline.api import load_model, load_tokenizer
from runtime.cli import ArgumentParser, run_cli
from runtime.errors import UserError
from pipeline.first_use import find_or_build
from pipeline.training.compensation import INITS, compensate, float_base_of
from pipeline.training.data import load_dataset
from pipeline.training.optimizer import SCHEDULES
from pipeline.training.trainer import TrainSettings, train


def parse_args(argv=None) -> argparse.Namespace:
    d = TrainSettings()
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="base: name under models/ (e.g. smollm2-135m.nf4dq, built on "
                   "first use), HF directory or Hub model (default: smollm2-135m)")
    p.add_argument("--data", required=True, help="text file, or .jsonl of prompt/response or messages records")
    p.add_argument("--out", required=True, help="directory for the adapter and its checkpoint")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha, help="LoRA scale is alpha / rank")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout on the LoRA input")
    p.add_argument("--targets", default=None, help="comma-separated projections to adapt (default: every "
                   "projection of a layer: q_proj,...,down_proj for Llama, q_proj,...,fc2 for OPT)")
    p.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per window / longest record")
    p.add_argument("--batch", type=int, default=d.batch, help="windows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=0, help="optimizer steps")
    length.add_argument("--epochs", type=float, default=d.epochs, help="passes over the data (when no --steps)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup, help="steps of linear warm-up")
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--init", default=d.init, choices=INITS, help="the adapter's start: LoRA's (B = 0), or "
                   "factors that cancel a quantized base's error: LoftQ (SVD of W - Q) or CLoQ (the same, weighted "
                   "by the training data's activations; best)")
    p.add_argument("--float-base", default=None, help="for --init loftq/cloq: the float model the base was "
                   "quantized from (default: the one the base's config.json records)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    checks = [("--rank", args.rank >= 1), ("--alpha", math.isfinite(args.alpha) and args.alpha > 0),
              ("--dropout", 0 <= args.dropout < 1), ("--seqlen", args.seqlen >= 1), ("--batch", args.batch >= 1),
              ("--grad-accum", args.grad_accum >= 1), ("--steps", args.steps >= 0),
              ("--epochs", math.isfinite(args.epochs) and args.epochs > 0),
              ("--lr", math.isfinite(args.lr) and args.lr > 0), ("--warmup", args.warmup >= 0),
              ("--weight-decay", math.isfinite(args.weight_decay) and args.weight_decay >= 0),
              ("--max-grad-norm", math.isfinite(args.max_grad_norm) and args.max_grad_norm >= 0),
              ("--seed", args.seed >= 0), ("--save-every", args.save_every >= 0)]
    for option, ok in checks:
        if not ok:
            p.error(f"{option} {getattr(args, option[2:].replace('-', '_'))} is out of range")
    if args.float_base is not None and args.init == "lora":
        p.error("--float-base is used by --init loftq or cloq only")
    if args.targets is not None:
        args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        if not args.targets:
            p.error("--targets is empty: name the projections to adapt, e.g. q_proj,v_proj")
    return args


def main(argv=None):
    args = parse_args(argv)
    path = find_or_build(args.model)
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise UserError(f"{path} has no tokenizer, so text cannot be turned into training tokens")
    if args.seqlen > model.config.max_positions:
        raise UserError(f"--seqlen {args.seqlen} exceeds the model's context of {model.config.max_positions}")
    settings = TrainSettings(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=tuple(args.targets or ()),
                             seqlen=args.seqlen, batch=args.batch, grad_accum=args.grad_accum, steps=args.steps,
                             epochs=args.epochs, lr=args.lr, warmup=args.warmup, schedule=args.schedule,
                             weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed,
                             init=args.init)
    dataset = load_dataset(args.data, tokenizer, args.seqlen, args.batch, args.seed)
    initialize = None
    if args.init != "lora" and not args.resume:
        float_base = find_or_build(args.float_base) if args.float_base else float_base_of(path)
        initialize = partial(compensate, model=model, init=args.init, float_base=float_base, dataset=dataset,
                             seqlen=args.seqlen, progress=not args.quiet)
    out = Path(args.out)
    train(model, dataset, settings, out, args.model or str(path), args.save_every, args.resume, not args.quiet,
          initialize)
    print(f"adapter written to {out}: python run.py --model {args.model or path} --lora {out} \"prompt\"")


if __name__ == "__main__":
    run_cli(main)
