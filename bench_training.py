"""The QLoRA training benchmark (issue 17): `python bench_training.py` writes benchmarks/training.md.

Throughput and memory. Each engine trains in a fresh process of its own, with
its own defaults (the child's environment has none of our variables: no
QLLM_*, NUMBA_*, OPENBLAS_NUM_THREADS or OMP_*): LoRA of rank 16 (alpha 32,
dropout 0.05) on all seven projections of SmolLM2-135M, windows of 512 tokens
of WikiText-2 validation (our tokenizer's ids, the same for every engine),
one window per step, AdamW; one warm-up step, then --steps timed steps:

- ours on the NF4-DQ base (`smollm2-135m.nf4dq`, QLoRA's setting) and on the
  float base, through `pipeline.training.trainer.train` with BLAS on every
  core as train.py (`runtime.blas_on_every_core`); ours always checkpoints
  activations (per half layer: recomputes each half in the backward);
- PEFT + torch on the float base with `torch.set_num_threads(cores)`, without
  and with gradient checkpointing (transformers' per-layer checkpointing, the
  QLoRA paper's setting, which recomputes as ours does).

Tokens/s of the timed steps and the process's peak RSS (VmHWM); rounds
interleave the engines; medians over --rounds.

Quality (--quality): the NF4-DQ base from LoRA's start (QLoRA's setting) and
from CLoQ's (`train.py --init cloq`), and the float base from LoRA's start, are
fine-tuned with the same settings (--quality-steps optimizer steps of 4 windows
of 512 from wiki.valid.tokens, lr 2e-4, cosine, 2 warm-up steps), each in its
own process; WikiText-2 test perplexity (16 windows of 2048, as eval.py) is
measured before and after. Each finished run is kept in
.cache/bench/training-quality.json, so a rerun with the same steps continues.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_llamacpp import status_mb

PROJECT = Path(__file__).resolve().parent
SEQLEN = 512
RANK, ALPHA, DROPOUT = 16, 32.0, 0.05
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENGINES = {"ours-nf4dq": "ours, NF4-DQ base", "ours-float": "ours, float base",
           "peft": "PEFT + torch, float base", "peft-checkpointing": "PEFT + torch, float base, gradient checkpointing"}
PPL_SEQLEN, PPL_WINDOWS = 2048, 16
# LoRA (rank, alpha, dropout) of the quality runs: the throughput runs' settings, and QLoRA's own (Dettmers et
# al. 2023; artidoro/qlora scripts/finetune_guanaco_7b.sh: --lora_r 64 --lora_alpha 16 --lora_dropout 0.1)
LORA_SETTINGS = {"rank 16, alpha 32, dropout 0.05": (RANK, ALPHA, DROPOUT),
                 "rank 64, alpha 16, dropout 0.1 (QLoRA's)": (64, 16.0, 0.1)}
# label -> (base, train.py --init, LORA_SETTINGS key): per settings, QLoRA's setting (LoRA's start on the
# NF4-DQ base), the same from CLoQ's start, and the float base
QUALITY_RUNS = {f"{base}{suffix}{', --init cloq' if init == 'cloq' else ''}": (base, init, lora)
                for lora, suffix in zip(LORA_SETTINGS, ("", ", r64"))
                for base, init in (("smollm2-135m.nf4dq", "lora"), ("smollm2-135m.nf4dq", "cloq"), ("smollm2-135m", "lora"))}
OUR_VARIABLES = ("QLLM_", "NUMBA_", "OPENBLAS_", "OMP_")


def windows(ids, count: int) -> list:
    """The first `count` training windows of ids: (inputs [SEQLEN], targets = the next tokens), cut as
    pipeline.training.data.text_examples cuts them; written here so that the PEFT child imports nothing of ours
    (importing runtime would set its thread defaults in that process)."""
    return [(ids[s:s + SEQLEN], ids[s + 1:s + SEQLEN + 1]) for s in range(0, count * SEQLEN, SEQLEN)]


# ---- the children: one engine each, one JSON line out ----------------------------------------

def child_ours(base: str, ids_path: str, steps: int) -> dict:
    import runtime

    runtime.blas_on_every_core()  # as train.py, before NumPy loads
    import numpy as np

    from pipeline.api import load_model
    from pipeline.first_use import find_or_build
    from pipeline.training.data import Dataset
    from pipeline.training.trainer import TrainSettings, train as run_training

    model = load_model(find_or_build(base, progress=False))
    ids = np.load(ids_path)
    data = Dataset(windows(ids, steps + 1), batch=1, seed=0)
    settings = dict(rank=RANK, alpha=ALPHA, dropout=DROPOUT, targets=TARGETS, seqlen=SEQLEN, batch=1, grad_accum=1,
                    warmup=0, schedule="constant")
    with tempfile.TemporaryDirectory() as out:
        run_training(model, data, TrainSettings(steps=1, **settings), Path(out) / "warm", base, progress=False)
        began = time.perf_counter()
        run_training(model, data, TrainSettings(steps=steps, **settings), Path(out) / "timed", base, progress=False)
        seconds = time.perf_counter() - began
    return {"tok_s": steps * SEQLEN / seconds, "rss": status_mb("VmHWM")}


def child_peft(ids_path: str, steps: int, checkpointing: bool) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(PROJECT / "models" / "smollm2-135m", dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                             target_modules=list(TARGETS)))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    batches = windows(np.load(ids_path), steps + 1)

    def step(inputs, targets):
        logits = model(input_ids=torch.from_numpy(inputs)[None]).logits[0]  # [T, vocab]
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(targets)).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()

    step(*batches[0])
    began = time.perf_counter()
    for inputs, targets in batches[1:]:
        step(inputs, targets)
    return {"tok_s": steps * SEQLEN / (time.perf_counter() - began), "rss": status_mb("VmHWM")}


def run_child(engine: str, ids_path: Path, steps: int) -> dict:
    """One measurement in a fresh process whose environment has none of our variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(OUR_VARIABLES)}
    result = subprocess.run([sys.executable, __file__, "--child", engine, "--ids", str(ids_path),
                             "--steps", str(steps)], env=env, cwd=PROJECT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{engine} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- the parent ---------------------------------------------------------------------------

def token_ids(split: str):
    """Our tokenizer's ids of WikiText-2 `split` (valid or test) from ../shared (runtime/text/datasets.py)."""
    import numpy as np

    from pipeline.api import load_tokenizer
    from runtime.text.datasets import load_dataset

    tokenizer = load_tokenizer(PROJECT / "models" / "smollm2-135m")
    text = load_dataset("wikitext2") if split == "test" else load_dataset(
        str(PROJECT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"))
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def throughput(rounds: int, steps: int, work: Path) -> dict:
    """engine -> {"tok_s": median, "rss": median, "all": [tok/s per round], "paired": the median over rounds
    of its tok/s over PEFT's in the same round}."""
    import numpy as np

    ids_path = work / "valid_ids.npy"
    np.save(ids_path, token_ids("valid")[:(steps + 2) * SEQLEN + 1])
    measured = {engine: [] for engine in ENGINES}
    for r in range(rounds):
        for engine in ENGINES:
            measured[engine].append(run_child(engine, ids_path, steps))
            print(f"round {r + 1}: {engine} {measured[engine][-1]}", file=sys.stderr)
    return {engine: {"tok_s": statistics.median(m["tok_s"] for m in runs),
                     "rss": statistics.median(m["rss"] for m in runs),
                     "all": [round(m["tok_s"], 1) for m in runs],
                     "paired": statistics.median(m["tok_s"] / p["tok_s"] for m, p in zip(runs, measured["peft"]))}
            for engine, runs in measured.items()}


def child_quality(label: str, steps: int) -> dict:
    """{"before", "start", "after"}: WikiText-2 test perplexity of QUALITY_RUNS[label]'s base alone, with its
    initial adapter, and after fine-tuning it from there on wiki.valid.tokens with the quality settings
    (module docstring)."""
    import runtime

    runtime.blas_on_every_core()  # as train.py, before NumPy loads
    import numpy as np

    from pipeline.api import load_model
    from pipeline.first_use import find_or_build
    from pipeline.perplexity import perplexity
    from pipeline.training.adapter import new_adapter, write_adapter
    from pipeline.training.compensation import compensate, float_base_of
    from pipeline.training.data import Dataset
    from pipeline.training.trainer import TrainSettings, train as run_training

    base, init, lora = QUALITY_RUNS[label]
    rank, alpha, dropout = LORA_SETTINGS[lora]
    test, valid = token_ids("test"), token_ids("valid")
    data = Dataset(windows(valid, (len(valid) - 1) // SEQLEN), batch=4, seed=0)
    settings = TrainSettings(rank=rank, alpha=alpha, dropout=dropout, targets=TARGETS, seqlen=SEQLEN, batch=4,
                             grad_accum=1, steps=steps, lr=2e-4, warmup=2, schedule="cosine", init=init)
    path = find_or_build(base, progress=False)
    ppl = {"before": perplexity(load_model(path), test, PPL_SEQLEN, PPL_WINDOWS, progress=False)["ppl"]}
    model = load_model(path)
    with tempfile.TemporaryDirectory() as work:
        ppl["start"], initialize = ppl["before"], None  # LoRA's start: B = 0, the base alone
        if init != "lora":
            start = new_adapter(model, list(TARGETS), rank, alpha, np.random.default_rng(settings.seed))
            compensate(start, model, init, float_base_of(path), data, SEQLEN, progress=False)
            write_adapter(Path(work) / "start", start, base, dropout)
            ppl["start"] = perplexity(load_model(path, lora=str(Path(work) / "start")), test, PPL_SEQLEN,
                                      PPL_WINDOWS, progress=False)["ppl"]

            def initialize(adapter):  # the factors just measured, not a second calibration
                for name in adapter.names():
                    adapter.A[name][...], adapter.B[name][...] = start.A[name], start.B[name]

        run_training(model, data, settings, Path(work) / "trained", base, progress=False, initialize=initialize)
        ppl["after"] = perplexity(load_model(path, lora=str(Path(work) / "trained")), test, PPL_SEQLEN,
                                  PPL_WINDOWS, progress=False)["ppl"]
    return ppl


def quality(steps: int, saved: Path) -> dict:
    """label -> {"before", "after"} for each of QUALITY_RUNS, fine-tuned alike, each in a child process
    (`child_quality`). Each finished run is written to `saved` at once, and a rerun with the same steps
    reuses it: an interrupted run loses no finished one."""
    from runtime.checkpoints.atomic import write_text

    previous = json.loads(saved.read_text()) if saved.exists() else {}
    results = previous.get("results", {}) if previous.get("steps") == steps else {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(OUR_VARIABLES)}
    for label in QUALITY_RUNS:
        if label not in results:
            result = subprocess.run([sys.executable, __file__, "--child", "quality", "--run", label,
                                     "--quality-steps", str(steps)], env=env, cwd=PROJECT, capture_output=True,
                                    text=True)
            if result.returncode:
                raise SystemExit(f"fine-tuning {label} failed:\n{result.stderr[-3000:]}")
            results[label] = json.loads(result.stdout.strip().splitlines()[-1])
            write_text(saved, json.dumps({"steps": steps, "results": results}, indent=1))
        print(f"{label}: {results[label]['before']:.3f} -> {results[label]['after']:.3f}", file=sys.stderr)
    return results


def document(command: str, speed: dict, settings: dict, ppl: dict | None) -> str:
    """The text of benchmarks/training.md."""
    from bench import machine

    peft = speed["peft"]
    lines = ["# QLoRA training benchmark", "",
             f"Written by `{command}` on {time.strftime('%Y-%m-%d')}. Machine: {machine()}. CPU only.", "",
             "How: bench_training.py's docstring. SmolLM2-135M, LoRA rank 16 (alpha 32, dropout 0.05) on all "
             f"seven projections, one window of {SEQLEN} tokens per step, AdamW; {settings['steps']} timed steps "
             f"after one warm-up step, each engine in its own process; median of {settings['rounds']} interleaved "
             "rounds. This machine's speed drifts by up to 40% for tens of seconds at a time (every engine's "
             "steps alike), so beside the ratio of the medians stands the paired ratio: the median over rounds of "
             "each round's ratio to PEFT + torch, whose runs sit next to each other in time.", "",
             "| engine | training tok/s | per round | x PEFT + torch | paired | peak RSS MB | x PEFT + torch |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for engine, label in ENGINES.items():
        m = speed[engine]
        lines.append(f"| {label} | {m['tok_s']:.1f} | {', '.join(map(str, m['all']))} | "
                     f"{m['tok_s'] / peft['tok_s']:.2f} | {m['paired']:.2f} | {m['rss']:.0f} | "
                     f"{m['rss'] / peft['rss']:.2f} |")
    if ppl:
        lines += ["", f"Quality: each base fine-tuned with the same settings for {settings['quality_steps']} steps of "
                  f"4 windows of {SEQLEN} from wiki.valid.tokens (lr 2e-4, cosine, 2 warm-up steps), with LoRA "
                  "rank 16 as above or with QLoRA's own rank 64, alpha 16, dropout 0.1, from LoRA's start "
                  "(B = 0) or, on the NF4-DQ base, from CLoQ's (`train.py --init cloq`: factors that cancel the "
                  "quantization error as the training text's activations see it; "
                  "pipeline/training/compensation.py); WikiText-2 test perplexity, first "
                  f"{PPL_WINDOWS} windows of {PPL_SEQLEN}, as eval.py (before: the base alone; at the start: with "
                  "the initial adapter):", "",
                  "| LoRA | base | start | before | at the start | after | change | after vs the float base's after |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for lora in LORA_SETTINGS:
            runs = {label: run for label, run in QUALITY_RUNS.items() if run[2] == lora and label in ppl}
            floats = [ppl[label]["after"] for label, run in runs.items() if run[0] == "smollm2-135m"]
            for label, (base, init, _) in runs.items():
                r = ppl[label]
                versus = f"{100 * (r['after'] / floats[0] - 1):+.2f}%" if floats else ""
                lines.append(f"| {lora} | {base} | {init} | {r['before']:.3f} | {r.get('start', r['before']):.3f} | "
                             f"{r['after']:.3f} | {100 * (r['after'] / r['before'] - 1):+.2f}% | {versus} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per measurement")
    p.add_argument("--quality", action="store_true", help="also fine-tune both bases and measure perplexity")
    p.add_argument("--quality-steps", type=int, default=20)
    p.add_argument("--no-write", action="store_true", help="print the document instead of writing it")
    p.add_argument("--child", choices=[*ENGINES, "quality"], help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    p.add_argument("--run", choices=QUALITY_RUNS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "quality":
        print(json.dumps(child_quality(args.run, args.quality_steps)))
        return
    if args.child:
        result = (child_ours(f"smollm2-135m{'.nf4dq' if args.child == 'ours-nf4dq' else ''}", args.ids, args.steps)
                  if args.child.startswith("ours") else child_peft(args.ids, args.steps, args.child.endswith("ing")))
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        speed = throughput(args.rounds, args.steps, Path(tmp))
        saved = PROJECT / ".cache" / "bench" / "training-quality.json"
        ppl = quality(args.quality_steps, saved) if args.quality else None
    settings = {"rounds": args.rounds, "steps": args.steps, "quality_steps": args.quality_steps}
    text = document("python bench_training.py " + " ".join(argv if argv is not None else sys.argv[1:]), speed,
                    settings, ppl)
    if args.no_write:
        print(text)
        return
    from runtime.checkpoints.atomic import write_text

    (PROJECT / "benchmarks").mkdir(exist_ok=True)
    write_text(PROJECT / "benchmarks" / "training.md", text)
    print(text)


if __name__ == "__main__":
    main()
