"""The benchmark table: `make bench` writes BENCHMARKS.md and benchmarks.png.

For the float SmolLM2-135M and each quantized variant (built first if
missing): bits per weight of the decoder projections (side data included),
file size, WikiText-2 perplexity on the first 16 windows of 2048 tokens (the
same subset for every row), prefill and decode tokens/s on the CPU and peak
RSS. Speed and memory are measured in a fresh child process per variant and
round; the rounds interleave the variants (this machine is shared and noisy),
and the table reports medians, so rows are comparable as ratios. When
llama-cpp-python is installed, llama.cpp runs the same Q4_1 GGUF in the same
rounds.

    python bench.py [--rounds 5] [--variants smollm2-135m,smollm2-135m.rtn4g128]
    python bench.py --child NAME      (one speed/memory measurement, JSON on stdout)
"""
from __future__ import annotations

import runtime  # noqa: F401  (sets the thread defaults before NumPy loads)
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from runtime.cli import run_cli
from runtime.resolve import MODELS_DIR, PROJECT_ROOT

BASE = "smollm2-135m"
TAGS = ["rtn4g128", "rtn4", "rtn3g128", "rtn3", "rtn2g64", "gptq4g128", "gptq4", "gptq3g128", "gptq3",
        "gptq2g64", "gptq3g32", "nf4", "nf4dq", "fp4", "int8", "int8t150", "absmax8", "smooth8", "spqr4g32",
        "spqr3g32t50", "quip2", "quipsharp2", "quipsharp3", "quipsharp4"]
GGUF = MODELS_DIR / f"{BASE}.Q4_1.gguf"
LLAMA_CPP = "llama.cpp Q4_1"
PREFILL_TOKENS, DECODE_TOKENS = 128, 64
PPL_WINDOWS, PPL_SEQLEN = 16, 2048


def bench_ids(tokenizer) -> list:
    """The fixed prompt of every speed run: the first PREFILL_TOKENS tokens of WikiText-2."""
    from runtime.datasets import load_dataset
    return tokenizer.encode(load_dataset("wikitext2")[:4000])[:PREFILL_TOKENS]


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it does not inherit the parent's peak across exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_ours(name: str) -> dict:
    """Prefill PREFILL_TOKENS, then decode DECODE_TOKENS greedily, after a warm-up (JIT)."""
    from runtime.api import load
    llm = load(name)
    model, ids = llm.model, bench_ids(llm.tokenizer)
    warm = model.new_cache(64)
    model.decode(int(np.argmax(model.prefill(ids[:16], warm))), warm)
    cache = model.new_cache(PREFILL_TOKENS + DECODE_TOKENS + 1)
    start = time.perf_counter()
    logits = model.prefill(ids, cache)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        logits = model.decode(int(np.argmax(logits)), cache)
    decode = time.perf_counter() - start
    return {"prefill": PREFILL_TOKENS / prefill, "decode": DECODE_TOKENS / decode, "rss": peak_rss_mb()}


def child_llama_cpp() -> dict:
    """The same measurement with llama.cpp (llama-cpp-python) on the Q4_1 GGUF, 2 threads."""
    from llama_cpp import Llama
    from runtime.tokenizer import Tokenizer
    ids = bench_ids(Tokenizer.load(GGUF))
    llm = Llama(str(GGUF), n_ctx=512, n_threads=2, n_batch=512, verbose=False)  # scores has n_batch rows
    llm.eval(ids[:16])
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode = time.perf_counter() - start
    return {"prefill": PREFILL_TOKENS / prefill, "decode": DECODE_TOKENS / decode, "rss": peak_rss_mb()}


def measure(name: str) -> dict:
    """One speed/memory measurement of `name` in a fresh process."""
    done = subprocess.run([sys.executable, __file__, "--child", name], cwd=PROJECT_ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child for {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return GGUF.is_file()


def perplexity_of(name: str) -> float:
    """WikiText-2 perplexity on the first PPL_WINDOWS windows (resumable, see runtime/perplexity.py)."""
    from runtime.api import load
    from runtime.datasets import load_dataset
    from runtime.perplexity import perplexity, state_path
    llm = load(name)
    ids = llm.tokenizer.encode(load_dataset("wikitext2"))
    return perplexity(llm.model, ids, PPL_SEQLEN, PPL_WINDOWS, state_path(llm.path, ids, PPL_SEQLEN))["ppl"]


class LlamaCppScorer:
    """llama.cpp behind the two calls runtime.perplexity makes of a model (new_cache, prefill)."""

    def __init__(self, path: Path, n_ctx: int):
        from llama_cpp import Llama
        self.llm = Llama(str(path), n_ctx=n_ctx, n_threads=2, n_batch=512, logits_all=True, verbose=False)

    def new_cache(self, max_len=None):
        self.llm.reset()

    def prefill(self, tokens, cache, all_logits=True):
        self.llm.eval([int(t) for t in tokens])
        return np.asarray(self.llm.scores[:len(tokens)])  # [T, vocab]


def perplexity_llama_cpp() -> float:
    """The same perplexity from llama.cpp's logits on the same windows (resumable like ours)."""
    from runtime.datasets import load_dataset
    from runtime.perplexity import perplexity, state_path
    from runtime.tokenizer import Tokenizer
    ids = Tokenizer.load(GGUF).encode(load_dataset("wikitext2"))
    state = state_path(GGUF, ids, PPL_SEQLEN, engine="llama.cpp")
    return perplexity(LlamaCppScorer(GGUF, PPL_SEQLEN), ids, PPL_SEQLEN, PPL_WINDOWS, state)["ppl"]


def size_info(name: str) -> dict:
    """Bits per weight of the decoder projections (codes + side data), file size, quantization time."""
    from model import Config
    from runtime.checkpoint import load_checkpoint
    from runtime.packed_checkpoint import is_packed_model, load_packed
    from runtime.quantize_model import bits_per_weight, find_or_build
    path = find_or_build(name)
    config, tensors = load_packed(path) if is_packed_model(path) else load_checkpoint(path)
    bits = bits_per_weight(Config.from_hf(config), tensors)
    quantization = config.get("quantization", {})
    return {"bits": bits, "file_mb": (path / "model.safetensors").stat().st_size / 1e6,
            "quant_s": quantization.get("seconds"), "quant_mb": quantization.get("peak_rss_mb")}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}"


def table(rows: dict, base: dict, reference: dict | None) -> str:
    """The markdown table; decode speed as a ratio to the float row and, when measured, to llama.cpp."""
    ref = " | decode vs llama.cpp" if reference else ""
    lines = ["| model | bits/weight | file MB | WikiText-2 ppl | prefill tok/s | decode tok/s | "
             f"decode vs float{ref} | peak RSS MB | RSS vs float | quantize s | quantize peak MB |",
             "| --- |" + " ---: |" * (11 if reference else 10)]
    for name, r in rows.items():
        quant = f"{r['quant_s']:.1f}" if r.get("quant_s") else ""
        quant_mb = f"{r['quant_mb']}" if r.get("quant_mb") else ""
        vs_ref = f" | {r['decode'] / reference['decode']:.2f}x" if reference else ""
        lines.append(f"| {name} | {r['bits']:.3f} | {r['file_mb']:.1f} | {r['ppl']:.3f} | {r['prefill']:.1f} | "
                     f"{r['decode']:.1f} | {r['decode'] / base['decode']:.2f}x{vs_ref} | {r['rss']:.0f} | "
                     f"{r['rss'] / base['rss']:.2f} | {quant} | {quant_mb} |")
    return "\n".join(lines)


def family(name: str) -> str:
    """The method a row belongs to, for the plot's colours: its tag's method, "float" or llama.cpp."""
    if name == LLAMA_CPP or "." not in name:
        return name if name == LLAMA_CPP else "float"
    from runtime.tags import parse_tag
    return parse_tag(name.rpartition(".")[2]).method


def plot(rows: dict, path: Path) -> None:
    """Perplexity against bits per weight, one colour per method; the float model as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.set_prop_cycle(color=plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2])  # 20 distinct colours
    families = {}
    for name, r in rows.items():
        families.setdefault(family(name), []).append((name, r))
    for method, members in families.items():
        if method == "float":
            for _, r in members:
                ax.axhline(r["ppl"], color="gray", linestyle="--", linewidth=1, label=f"float ({r['bits']:.0f} bits)")
            continue
        points = ax.scatter([r["bits"] for _, r in members], [r["ppl"] for _, r in members], label=method, s=22)
        for name, r in members:
            ax.annotate(name.rpartition(".")[2] if name != LLAMA_CPP else name, (r["bits"], r["ppl"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points", color=points.get_facecolor()[0])
    ax.set_xlabel("bits per weight (decoder projections, side data included)")
    ax.set_ylabel(f"WikiText-2 perplexity ({PPL_WINDOWS} x {PPL_SEQLEN})")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M-Instruct: perplexity against size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", default=",".join([BASE] + [f"{BASE}.{t}" for t in TAGS]))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child_llama_cpp() if args.child == LLAMA_CPP else child_ours(args.child)))
        return
    names = args.variants.split(",")
    rows = {name: size_info(name) for name in names}  # builds missing variants first
    for name in names:
        print(f"perplexity of {name} ...", flush=True)
        rows[name]["ppl"] = perplexity_of(name)
    if has_llama_cpp():
        gguf = {"bits": 4 + 2 * 16 / 32, "file_mb": GGUF.stat().st_size / 1e6}  # Q4_1: fp16 scale + min per 32
        rows[LLAMA_CPP] = dict(gguf, ppl=perplexity_llama_cpp())
    runs = {name: [] for name in rows}
    for round_ in range(args.rounds):
        for name in rows:
            print(f"round {round_ + 1}/{args.rounds}: {name}", flush=True)
            runs[name].append(measure(name))
    for name, results in runs.items():
        rows[name].update({key: statistics.median(r[key] for r in results) for key in ("prefill", "decode", "rss")})
    command = " ".join(["python bench.py"] + sys.argv[1:])
    text = "\n".join([
        "# Benchmarks", "",
        f"Written by `{command}` (`make bench`) on {time.strftime('%Y-%m-%d')}.", "",
        f"Machine: {machine()}. CPU only; our runtime with its defaults (Numba kernels on every core, BLAS on one "
        f"thread: runtime/__init__.py), llama.cpp (llama-cpp-python) with 2 threads.", "",
        f"Speed: prefill of {PREFILL_TOKENS} tokens, then {DECODE_TOKENS} greedy decode steps, each variant in a "
        f"fresh process after a warm-up; median of {args.rounds} interleaved rounds. Peak RSS of that process. "
        f"Perplexity: WikiText-2 test, first {PPL_WINDOWS} windows of {PPL_SEQLEN} tokens. Bits per weight: "
        f"decoder projections, from the stored bytes: codes plus scales/zeros/indices, SpQR's statistics and "
        f"outliers, QuIP's rescaling, QuIP#'s signs (the LM head is 8-bit and the embedding float16 in every "
        f"quantized row).", "",
        table(rows, rows[names[0]], rows.get(LLAMA_CPP)), "",
        "![perplexity against bits per weight](benchmarks.png)", ""])
    (PROJECT_ROOT / "BENCHMARKS.md").write_text(text)
    plot(rows, PROJECT_ROOT / "benchmarks.png")
    print(text)


if __name__ == "__main__":
    run_cli(main)
