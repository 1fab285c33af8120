"""Perplexity of a model on a text: `python eval.py --model NAME --dataset wikitext2|FILE`.

The GPTQ paper's protocol (see pipeline/perplexity.py) on WikiText-2's test
split (../shared/data, or the Hub's copy; runtime/text/datasets.py) or on any UTF-8
text file (PTB, C4, your own data). `--windows N` takes the first N windows
only; `--json` prints one JSON object. Finished windows are kept in
.cache/perplexity/, so an interrupted run resumes. Options and the text file
are checked before the model loads (missing, empty, binary), its length once
it is tokenized; bad input gets a one-line error and exit status 1.
"""
import argparse
import json

from runtime.cli import ArgumentParser, run_cli
from runtime.text.datasets import DATASETS, load_dataset
from runtime.device import DEVICES
from runtime.errors import UserError


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="name under models/, directory, file, or Hugging Face Hub model "
                   "(org/name[@revision], or a short name such as opt-1.3b); default: smollm2-135m")
    p.add_argument("--dataset", default="wikitext2", metavar="wikitext2|FILE",
                   help=f"a data set ({', '.join(DATASETS)}) or the path of any UTF-8 text file")
    p.add_argument("--seqlen", type=int, default=2048, help="window length, capped at the model's context")
    p.add_argument("--windows", type=int, default=None, help="evaluate the first N windows only")
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-resume", action="store_true", help="ignore windows saved by an earlier run")
    return check_args(p.parse_args(argv))


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """`args` when --seqlen and --windows are in range; UserError saying what to give otherwise."""
    if args.seqlen < 2:
        raise UserError(f"--seqlen must be >= 2 (a window predicts all its tokens but the first), got {args.seqlen}")
    if args.windows is not None and args.windows < 1:
        raise UserError(f"--windows must be >= 1 (or left out for all windows), got {args.windows}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from pipeline.api import load
    from pipeline.perplexity import perplexity, state_path
    text = load_dataset(args.dataset)
    llm = load(args.model, args.device)
    if llm.tokenizer is None:
        raise UserError(f"{llm.path} has no tokenizer, so it cannot read {args.dataset}")
    seqlen = min(args.seqlen, llm.model.config.max_positions)
    ids = llm.tokenizer.encode(text)
    if len(ids) < seqlen:
        raise UserError(f"{args.dataset} is too short: {len(ids)} tokens, fewer than one window of {seqlen}: "
                        f"give a longer text or a smaller --seqlen")
    state = state_path(llm.path, ids, seqlen)
    if args.no_resume and state.exists():
        state.unlink()
    result = perplexity(llm.model, ids, seqlen, args.windows, state, progress=not args.json)
    result.update(model=str(llm.path), dataset=args.dataset)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.dataset} perplexity {result['ppl']:.4f} over {result['tokens']} predicted tokens "
              f"({result['windows']} windows of {result['seqlen']})")


if __name__ == "__main__":
    run_cli(main)
