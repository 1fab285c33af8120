"""Build time and peak memory of quantizing a 1B-class checkpoint (issue 15): `python bench_build.py` writes
benchmarks/build.md.

The model is a random-weight OPT with facebook/opt-1.3b's config, float32
safetensors (built once under .cache/bench/opt-1.3b by bench_models.save_random_model; the
time of a method does not depend on the weights' values). Each measurement is
a fresh process; its wall time and peak RSS (the child's ru_maxrss, from
wait4) are recorded, each row in .cache/bench/build-rows.json as soon as it
finishes (a rerun for the same model and windows measures only the rows not
there yet, and those named by --again, e.g. after a change of a method's code:
`--again floor-calibration,quipsharp2` measures that floor in the same run):

- each method's build: `quantize.py --model M --method ... --out TMP`, the
  command a user runs (calibrated methods with --nsamples windows of 512
  tokens of WikiText-2 validation);
- the I/O floor: read every tensor of the checkpoint (materialized from the
  mapped file) and write them again as safetensors: what RTN and NF4, which
  read each weight once and write its codes, cannot go below;
- the calibration floor: the calibration windows through every decoder layer,
  twice (true-sequential runs each layer again with its quantized weights, so
  two passes are the least a calibrated method does), float32 weights.

Targets (issue 15): every calibrated method within 2x of the calibration
floor, RTN and NF4 within 2x of the I/O floor, peak RSS under 1.5x the float
checkpoint's size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent
MODEL = PROJECT / ".cache" / "bench" / "opt-1.3b"
SEQLEN = 512
METHODS = {  # row name -> quantize.py arguments
    "rtn4g128": ["--method", "rtn", "--bits", "4", "--group", "128"],
    "nf4dq": ["--method", "nf", "--dq"],
    "int8": ["--method", "int", "--bits", "8"],
    "gptq4g128": ["--method", "gptq", "--bits", "4", "--group", "128"],
    "spqr3g16": ["--method", "spqr", "--bits", "3"],
    "quip2": ["--method", "quip", "--bits", "2"],
    "quipsharp2": ["--method", "quipsharp", "--bits", "2"],
}
CALIBRATED = ("gptq4g128", "spqr3g16", "quip2", "quipsharp2")
FLOOR_IO, FLOOR_CALIBRATION = "floor-io", "floor-calibration"
FLOORS = (FLOOR_IO, FLOOR_CALIBRATION)  # the rows every run measures besides its methods


def measure(command: list[str], env: dict) -> dict:
    """Wall seconds and peak RSS (MB) of one child process running `command` in the project with `env`. Its
    stderr (progress bars: unbounded) goes to a file, not a pipe that nobody reads while it runs, which would
    stall the child once the pipe is full."""
    with tempfile.TemporaryFile(mode="w+") as stderr:
        began = time.perf_counter()
        child = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - began
        if os.waitstatus_to_exitcode(status):
            stderr.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{stderr.read()[-3000:]}")
    return {"seconds": seconds, "rss": usage.ru_maxrss / 1024}


# ---- the floors, each run as `bench_build.py --floor NAME` in a child -----------------------------

def floor_io(model: Path, out: Path) -> None:
    """Read every tensor of the checkpoint into memory and write them all again as safetensors."""
    import numpy as np

    from runtime.checkpoints.checkpoint import load_checkpoint
    from runtime.checkpoints.safetensors_io import write_safetensors

    _, tensors = load_checkpoint(model)
    write_safetensors(out / "model.safetensors", {name: np.array(t) for name, t in tensors.items()})


def floor_calibration(model: Path, nsamples: int) -> None:
    """The calibration windows through every decoder layer twice, float32 weights, as calibrate() runs them."""
    import runtime

    runtime.blas_on_every_core()  # as quantize.py, before NumPy loads
    import numpy as np

    from model import Config, Model
    from pipeline.api import load_tokenizer
    from pipeline.calibration import CalibrationSettings
    from pipeline.quantize_model import calibration_windows
    from runtime.checkpoints.checkpoint import load_checkpoint

    hf_config, tensors = load_checkpoint(model)
    net = Model(Config.from_hf(hf_config), tensors)
    windows = calibration_windows(load_tokenizer(model), CalibrationSettings(nsamples=nsamples, seqlen=SEQLEN))
    hidden = np.stack([net.embed_tokens(w, 0) for w in windows])  # [nsamples, seqlen, d]
    outputs = np.empty_like(hidden)  # [nsamples, seqlen, d]
    cache = net.new_cache(SEQLEN)
    for i, weights in enumerate(net.layers):
        for _ in range(2):
            for s in range(len(hidden)):
                outputs[s] = net.block(weights, hidden[s], cache, i)  # [seqlen, d]
        hidden, outputs = outputs, hidden


# ---- the parent ---------------------------------------------------------------------------------

def run_all(model: Path, nsamples: int, rows: list[str], work: Path, saved: Path, env: dict, command: str,
            again: tuple = ()) -> dict:
    """{window count: {"command", "results": {row: {"seconds", "rss"}}}} of every run saved for `model`, this
    one ({nsamples}) measured now: the floors and the methods, each child with `env` (the environment this
    command started with, before importing runtime set its own defaults). Each finished row is written to `saved`
    (atomically) at once, and rows already there for the same model and windows are not measured again: an
    interrupted run loses no finished row, and runs with other window counts stay beside it. The rows in `again`
    are measured even when saved (each keeps its place in the table)."""
    from runtime.checkpoints.atomic import write_text

    previous = json.loads(saved.read_text()) if saved.exists() else {}
    runs = previous.get("runs", {}) if previous.get("model") == str(model.resolve()) else {}
    run = runs.setdefault(str(nsamples), {"results": {}})
    run["command"], results = command, run["results"]
    here = [sys.executable, str(Path(__file__).resolve())]
    commands = {FLOOR_IO: here + ["--floor", "io", "--model", str(model), "--out", str(work)],
                FLOOR_CALIBRATION: here + ["--floor", "calibration", "--model", str(model), "--nsamples",
                                             str(nsamples)]}
    for row in rows:
        extra = ["--nsamples", str(nsamples)] if row in CALIBRATED else []
        commands[row] = [sys.executable, "quantize.py", "--model", str(model), *METHODS[row], *extra,
                         "--out", str(work / row)]
    for row, command_line in commands.items():
        if row not in results or row in again:
            results[row] = measure(command_line, env)
            write_text(saved, json.dumps({"model": str(model.resolve()), "runs": runs}, indent=1))
        print(row, results[row], file=sys.stderr)
    return runs


def document(model: Path, runs: dict) -> str:
    """The text of benchmarks/build.md: one table per window count of `runs` (`run_all`)."""
    from bench import machine

    size = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
    lines = ["# Build time and peak memory at 1.3B", "",
             f"Machine: {machine()}. Written on {time.strftime('%Y-%m-%d')}.", "",
             f"Model: {'random weights with facebook/opt-1.3b' + chr(39) + 's config' if model == MODEL.resolve() else model}, "
             f"float32 safetensors of {size:.0f} MB. Calibrated methods: windows of {SEQLEN} tokens of WikiText-2 "
             f"validation, as many as each table says (quantize.py's default is 32); each floor is measured with "
             f"the same windows. A method's own per-layer math (GPTQ's Hessian factorisation and column loop) does "
             f"not grow with the windows, so with more windows its ratio to the floor is lower. How: "
             f"bench_build.py's docstring; one fresh process per row."]
    for nsamples, run in sorted(runs.items(), key=lambda item: int(item[0])):
        results = run["results"]
        io, calib = results[FLOOR_IO]["seconds"], results[FLOOR_CALIBRATION]["seconds"]
        lines += ["", f"### {nsamples} calibration windows", "", f"Written by `{run['command']}`.", "",
                  "| row | seconds | x its floor | peak RSS MB | x checkpoint size |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for row, m in results.items():
            floor = "" if row.startswith("floor") else f"{m['seconds'] / (calib if row in CALIBRATED else io):.2f}"
            lines.append(f"| {row} | {m['seconds']:.0f} | {floor} | {m['rss']:.0f} | {m['rss'] / size:.2f} |")
    lines += ["", "Floors: floor-io reads every tensor and writes it again (the floor of RTN, NF4 and int8); "
              "floor-calibration runs the windows through every layer twice (the floor of GPTQ, SpQR, QuIP and "
              "QuIP#). Targets: calibrated methods within 2x of floor-calibration, the others within 2x of "
              "floor-io, peak RSS under 1.5x the checkpoint."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(MODEL), help="float checkpoint (default: the random OPT-1.3b)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows of the calibrated methods")
    p.add_argument("--rows", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--again", default="", help="comma-separated rows to measure again even if saved (methods of "
                   "--rows, floor-io, floor-calibration)")
    p.add_argument("--no-write", action="store_true", help="print the document instead of writing it")
    p.add_argument("--floor", choices=("io", "calibration"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    env = dict(os.environ)  # before runtime is imported: each child sets its own thread defaults as a user's run does
    model = Path(args.model).resolve()
    if args.floor == "io":
        return floor_io(model, Path(args.out))
    if args.floor == "calibration":
        return floor_calibration(model, args.nsamples)
    if model == MODEL.resolve() and not (model / "config.json").exists():  # the default model: made once, here
        print(f"writing random float weights with opt-1.3b's config to {model} ...", flush=True)
        # in a child: this process stays small, and the children it measures start from its size (a forked
        # child's peak RSS counts its parent's pages at the fork)
        subprocess.run([sys.executable, "-c", "import sys, bench_models; bench_models.save_random_model("
                        "sys.argv[1], bench_models.hf_config('opt-1.3b'))", str(model)], cwd=PROJECT, check=True)
    if not (model / "config.json").exists():
        raise SystemExit(f"{model} has no config.json: give --model a Hugging Face model directory")
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in METHODS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: choose from {', '.join(METHODS)}")
    again = tuple(r for r in args.again.split(",") if r)
    stray = [r for r in again if r not in (*rows, *FLOORS)]
    if stray:
        raise SystemExit(f"--again {','.join(stray)}: name rows of --rows or {', '.join(FLOORS)}")
    command = ("python bench_build.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    with tempfile.TemporaryDirectory(dir=PROJECT / ".cache") as tmp:
        runs = run_all(model, args.nsamples, rows, Path(tmp), PROJECT / ".cache" / "bench" / "build-rows.json",
                       env, command, again)
    text = document(model, runs)
    print(json.dumps(runs), file=sys.stderr)
    if args.no_write:
        print(text)
        return None
    from runtime.checkpoints.atomic import write_text

    (PROJECT / "benchmarks").mkdir(exist_ok=True)
    write_text(PROJECT / "benchmarks" / "build.md", text)
    print(text)
    return None


if __name__ == "__main__":
    main()
