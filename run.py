"""Generate text from a model: `python run.py --model NAME_OR_PATH "prompt"`.

Streams the continuation to stdout as it is generated, then prints one line
to stderr with token counts and prefill / decode speed. Bad input (a malformed
or out-of-range option, a model that produces NaN) gets a one-line error and
exit status 1.
"""
import argparse
import sys

from runtime.cli import ArgumentParser, run_cli
from runtime.device import DEVICES
from runtime.generation.sampling import SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    defaults = SamplingParams()
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="?", help="text to continue (or, with --chat, the user's message)")
    p.add_argument("--model", default=None,
                   help="name under models/, HF directory, .gguf or llama2.c .bin (default: smollm2-135m)")
    p.add_argument("--lora", default=None, metavar="DIR",
                   help="PEFT LoRA adapter directory to apply on top of the model (float or quantized)")
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="0 disables it")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="1 disables it")
    p.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--verify", action="store_true", help="first check every tensor of the model in full "
                   "(recorded checksums, finite values); without a prompt, only that")
    args = p.parse_args(argv)
    if args.prompt is None and not args.verify:
        p.error("the prompt is missing: give the text to continue (or --verify alone to check the model)")
    return args


def main(argv=None):
    args = parse_args(argv)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed,
                   max_new_tokens=args.max_new_tokens)
    SamplingParams(**options).check()  # before the model loads
    if args.prompt is None:  # --verify alone
        from pipeline.first_use import find_or_build
        from runtime.checkpoints.verify import verify_model
        print(verify_model(find_or_build(args.model)))
        return
    from pipeline.api import load
    llm = load(args.model, args.device, lora=args.lora, verify=args.verify)
    for piece in llm.stream(args.prompt, chat=args.chat, system=args.system, **options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(llm.last_stats.summary(), file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
