"""The CPU benchmark: `make bench` writes BENCHMARKS.md, benchmarks.png and the README's benchmark tables.

Each model family's table comes whole from one run: a run saves the
families it measured under benchmarks/speed/ (one JSON file each, with the
run's command, date, machine and llama.cpp build) and writes BENCHMARKS.md
and the README's tables from every saved family, so that one family can be
measured again without the hours of the others.

Rows, each a model run by one engine:
- SmolLM2-135M-Instruct: our float model and its quantized variants (built
  first if missing), and llama.cpp on the Q4_1 GGUF they come from; bits per
  weight, file size and WikiText-2 perplexity (first 16 windows of 2048).
- 1B-class shapes with random weights (speed does not depend on the values),
  built by this benchmark under .cache/bench/ once: a Llama with
  TinyLlama-1.1B's shapes (float32; RTN, NF4 and int8 quantized from it; GPTQ,
  SpQR, QuIP and QuIP# as packed codes drawn at random, labelled "random
  codes") and the same Llama converted to an F16 GGUF and quantized by
  llama.cpp itself (Q8_0, Q4_0, Q2_K); a model with OPT-1.3b's shapes (no
  llama.cpp row: llama.cpp has no OPT architecture).

Every measurement runs in a fresh process with its engine's own defaults:
ours is `bench.py --child` (importing `runtime` sets its thread defaults),
llama.cpp is bench_llamacpp.py in an environment without the variables our
runtime sets; both get the same thread count (ours NUMBA_NUM_THREADS,
llama.cpp n_threads / n_threads_batch), the same 128 prompt tokens of
WikiText-2 and the same number of greedy decode steps. The rounds interleave
the rows (row 1, row 2, ..., then round 2) and the table gives medians, each
of our rows beside the llama.cpp row of its size.

    python bench.py [--rows PATTERN,...] [--rounds 5] [--steps 64] [--threads 2] [--no-perplexity] [--no-write]
    python bench.py --prepare-only      (build every model and perplexity first: hours for SmolLM2's GPTQ,
                                         SpQR and QuIP# variants; the timed rounds then take about an hour)
    python bench.py --child DIR --ids 1,2,3 --steps 64     (one measurement of ours, JSON on stdout)
    python bench.py --export-comparison  (WikiText-2 perplexity in llama.cpp of our SmolLM2 gptq4g32sym exported
                                          as GGUF Q4_0 beside llama.cpp's own Q4_0 of the Q4_1 base; a markdown
                                          section on stdout, for BENCHMARKS.md)
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench_llamacpp import cmake_args, cpu_flags, status_mb

PROJECT = Path(__file__).resolve().parent
CACHE = PROJECT / ".cache" / "bench"
SECTION_DIR = PROJECT / "benchmarks" / "speed"  # each model family's last written run (JSON), BENCHMARKS.md's source
SMOLLM = "smollm2-135m"
SMOLLM_TAGS = ("rtn4g128", "rtn4", "rtn3g128", "rtn3", "rtn2g64", "gptq4g128", "gptq4", "gptq3g128", "gptq3",
               "gptq2g64", "gptq3g32", "nf4", "nf4dq", "fp4", "int8", "int8t150", "absmax8", "smooth8", "spqr4g32",
               "spqr3g32t50", "quip2", "quipsharp2", "quipsharp3", "quipsharp4")
LLAMA_1B, OPT_1B = "tinyllama-1.1b", "opt-1.3b"  # keys of bench_models.SHAPES
LLAMA_1B_TAGS = ("rtn4g128", "rtn2g64", "nf4", "int8", "gptq4g128", "gptq2g64", "spqr3", "quip2", "quipsharp2",
                 "quipsharp4")
OPT_1B_TAGS = ("rtn4g128", "rtn2g64", "nf4", "int8", "quipsharp2")
LLAMA_1B_GGUF = ("F16", "Q8_0", "Q4_0", "Q2_K")
RANDOM_CODE_METHODS = ("gptq", "spqr", "quip", "quipsharp")  # Hessian-based: minutes per layer at 1B
FLOAT = "float"
OURS, LLAMA_CPP = "ours", "llama.cpp"  # the engines
OUR_VARIABLES = ("OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS")  # thread settings: each engine runs with its own
OUR_PREFIXES = ("NUMBA_",)
PREFILL_TOKENS = 128
PPL_WINDOWS, PPL_SEQLEN = 16, 2048
SECTIONS = {SMOLLM: "SmolLM2-135M-Instruct (real weights)",
            LLAMA_1B: "Llama with TinyLlama-1.1B's shapes (random weights)",
            OPT_1B: "OPT-1.3b's shapes (random weights)"}
README_START, README_END = "<!-- bench tables: written by bench.py -->", "<!-- end of bench tables -->"


@dataclass(frozen=True)
class Row:
    """One benchmark row: `engine` (ours or llama.cpp) running `base` as `kind` (a tag, FLOAT or a GGUF type)."""
    engine: str
    base: str
    kind: str

    @property
    def name(self) -> str:
        model = self.base if self.kind == FLOAT else f"{self.base}.{self.kind}"
        return f"{LLAMA_CPP} {model}" if self.engine == LLAMA_CPP else model

    @property
    def random_codes(self) -> bool:
        """Packed codes drawn at random (1B shapes, methods that need a Hessian)."""
        return self.engine == OURS and self.base != SMOLLM and self.kind != FLOAT and \
            tag_method(self.kind) in RANDOM_CODE_METHODS

    @property
    def label(self) -> str:
        return f"{self.name} (random codes)" if self.random_codes else self.name


def tag_method(tag: str) -> str:
    """The method of a quantization tag (rtn, gptq, quipsharp, ...)."""
    from pipeline.tags import parse_tag
    return parse_tag(tag).method


def default_rows() -> list[Row]:
    """Every row of the full benchmark, in table order."""
    rows = [Row(OURS, SMOLLM, FLOAT)] + [Row(OURS, SMOLLM, t) for t in SMOLLM_TAGS]
    rows.append(Row(LLAMA_CPP, SMOLLM, "Q4_1"))
    rows += [Row(OURS, LLAMA_1B, FLOAT)] + [Row(OURS, LLAMA_1B, t) for t in LLAMA_1B_TAGS]
    rows += [Row(LLAMA_CPP, LLAMA_1B, t) for t in LLAMA_1B_GGUF]
    return rows + [Row(OURS, OPT_1B, FLOAT)] + [Row(OURS, OPT_1B, t) for t in OPT_1B_TAGS]


def reference(row: Row) -> Row | None:
    """The llama.cpp row that `row` is compared with: the one GGUF of SmolLM2; for the 1B Llama the GGUF of the
    tag's bit width (float: F16, 8 bits: Q8_0, 3-4 bits: Q4_0, 2 bits: Q2_K); none for OPT."""
    from pipeline.tags import parse_tag
    if row.engine == LLAMA_CPP or row.base == OPT_1B:
        return None
    if row.base == SMOLLM:
        return Row(LLAMA_CPP, SMOLLM, "Q4_1")
    bits = 16 if row.kind == FLOAT else parse_tag(row.kind).bits
    return Row(LLAMA_CPP, row.base, "F16" if bits == 16 else "Q8_0" if bits == 8 else "Q4_0" if bits > 2 else "Q2_K")


def select(rows: list[Row], patterns: str | None) -> list[Row]:
    """The rows whose name matches one of the comma-separated shell patterns (all when None), plus the
    llama.cpp rows they are compared with, in table order."""
    from runtime.errors import UserError
    if patterns is None:
        return rows
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = {row for row in rows if any(fnmatch.fnmatchcase(row.name, p) for p in wanted)}
    if not chosen:
        raise UserError(f"--rows {patterns!r} matches no row; rows are named like {rows[1].name}, "
                        f"'{LLAMA_CPP} {LLAMA_1B}.Q4_0' (patterns: 'tinyllama*', '*Q4_0')")
    chosen |= {reference(row) for row in chosen} - {None}
    return [row for row in rows if row in chosen]


def schedule(rows: list[Row], rounds: int) -> list[tuple[int, Row]]:
    """The order of the measurements: every row once per round, round after round (interleaved)."""
    return [(r, row) for r in range(rounds) for row in rows]


def engine_environment(engine: str, threads: int, environ: dict) -> dict:
    """The environment of a measurement process: `environ` without the variables our runtime sets (its thread
    defaults, Numba's settings), so each engine starts from its own defaults; ours gets NUMBA_NUM_THREADS."""
    env = {k: v for k, v in environ.items() if k not in OUR_VARIABLES and not k.startswith(OUR_PREFIXES)}
    if engine == OURS:
        env["NUMBA_NUM_THREADS"] = str(threads)
    return env


def measure_command(row: Row, path: Path, ids: list[int], steps: int, threads: int) -> list[str]:
    """The command line of one measurement of `row` (model at `path`)."""
    ids_text = ",".join(str(i) for i in ids)
    if row.engine == LLAMA_CPP:
        return [sys.executable, str(PROJECT / "bench_llamacpp.py"), "measure", str(path), "--ids", ids_text,
                "--steps", str(steps), "--threads", str(threads)]
    return [sys.executable, str(PROJECT / "bench.py"), "--child", str(path), "--ids", ids_text, "--steps", str(steps)]


def run_json(command: list[str], engine: str, threads: int) -> dict:
    """Run a measurement or llama.cpp process in its engine's environment; its last stdout line as JSON."""
    done = subprocess.run(command, cwd=PROJECT, env=engine_environment(engine, threads, dict(os.environ)),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_ours(path: str, ids: list[int], steps: int) -> dict:
    """Prefill `ids`, then `steps` greedy decode steps, after a warm-up (JIT); RSS after the imports and peak;
    then the same prompt through run.py's generation loop (default sampling) for `steps` decode steps."""
    import runtime  # noqa: F401  (first: its thread defaults must precede NumPy)
    import numba  # noqa: F401  (loaded with the first kernel; part of the floor)
    import numpy as np
    from pipeline.api import load_model
    from runtime.generation.generate import GenerationStats, generate_ids
    from runtime.generation.sampling import SamplingParams
    from runtime.kernels.decode_step_numba import rms_norm
    import_rss = status_mb("VmRSS")
    one = np.ones(8, np.float32)
    rms_norm(one, one, np.float32(1e-5))  # one cached kernel: Numba's compiler context and LLVM come in
    jit_rss = status_mb("VmRSS")
    model = load_model(Path(path))
    warm = model.new_cache(64)
    model.decode(int(np.argmax(model.prefill(ids[:16], warm))), warm)
    cache = model.new_cache(len(ids) + steps + 1)
    start = time.perf_counter()
    logits = model.prefill(ids, cache)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        logits = model.decode(int(np.argmax(logits)), cache)
    decode = time.perf_counter() - start
    stats = GenerationStats()  # run.py's loop: default sampling, no end-of-sequence stop
    for _ in generate_ids(model, ids, SamplingParams(seed=0, max_new_tokens=steps + 1), set(), stats):
        pass
    return {"prefill": len(ids) / prefill, "decode": steps / decode, "rss": status_mb("VmHWM"),
            "import_rss": import_rss, "jit_rss": jit_rss, "sampled": stats.decode_steps / stats.decode_seconds}


# ---- the models ----

def model_path(row: Row) -> Path:
    """Where `row`'s model lives: models/ for SmolLM2 (our builds), .cache/bench/ for the 1B shapes."""
    from runtime.hub.resolve import MODELS_DIR
    if row.engine == LLAMA_CPP:
        return (MODELS_DIR if row.base == SMOLLM else CACHE) / f"{row.base}.{row.kind}.gguf"
    if row.base == SMOLLM:
        return MODELS_DIR / row.name
    return CACHE / (f"{row.name}-random" if row.random_codes else row.name)


def prepare(row: Row, threads: int) -> Path:
    """`row`'s model, made first when missing: SmolLM2 variants built as `run.py` builds them; 1B shapes from
    random floats (quantized by the method, or random codes) and the GGUFs by llama.cpp's quantizer."""
    import bench_models
    from runtime.errors import UserError
    from pipeline.first_use import find_or_build
    from pipeline.quantize_model import build_quantized
    from pipeline.tags import parse_tag
    path = model_path(row)
    if row.base == SMOLLM and row.engine == OURS:
        return find_or_build(row.name)
    if path.exists():
        return path
    if row.base == SMOLLM:
        raise UserError(f"{path} is missing: `make install` downloads it")
    config = bench_models.hf_config(row.base)
    if row.engine == OURS and row.kind == FLOAT:
        print(f"writing random float weights with {row.base}'s shapes to {path} ...", flush=True)
        bench_models.save_random_model(path, config)
        return path
    base = prepare(Row(OURS, row.base, FLOAT), threads)
    if row.random_codes:
        print(f"writing {row.name} with random codes to {path} ...", flush=True)
        bench_models.save_random_model(path, config, row.kind)
    elif row.engine == OURS:
        build_quantized(base, parse_tag(row.kind), path)
    elif row.kind == "F16":
        from runtime.checkpoints.checkpoint import load_checkpoint
        print(f"converting {base} to {path} ...", flush=True)
        bench_models.write_llama_gguf(path, config, load_checkpoint(base)[1], bench_models.tokenizer_files(config)[0])
    else:
        source = prepare(Row(LLAMA_CPP, row.base, "F16"), threads)
        print(f"quantizing {source} to {row.kind} with llama.cpp ...", flush=True)
        run_json([sys.executable, str(PROJECT / "bench_llamacpp.py"), "quantize", str(source), str(path), row.kind],
                 LLAMA_CPP, threads)
    return path


def prompt_ids(base_path: Path) -> list[int]:
    """The prompt of every speed run of a model family: the first PREFILL_TOKENS tokens of WikiText-2 test."""
    from runtime.text.datasets import load_dataset
    from runtime.text.tokenizer import Tokenizer
    return Tokenizer.load(base_path).encode(load_dataset("wikitext2")[:4000])[:PREFILL_TOKENS]


def gguf_bits(path: Path) -> float:
    """Bits per weight of a GGUF's decoder projections (blk.*, 2-D) from their stored bytes."""
    import gguf
    tensors = [t for t in gguf.GGUFReader(path).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def size_info(row: Row, path: Path) -> dict:
    """Bits per weight of the decoder projections (codes and side data), file MB, quantization time."""
    if row.engine == LLAMA_CPP:
        return {"bits": gguf_bits(path), "file_mb": path.stat().st_size / 1e6}
    quantization = json.loads((path / "config.json").read_text()).get("quantization", {})
    return {"bits": quantization.get("bits_per_weight", 32.0), "file_mb": sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6,
            "quant_s": None if quantization.get("random_codes") else quantization.get("seconds")}


# ---- perplexity (SmolLM2 only: random weights have none worth reporting) ----

def perplexity_ours(path: Path) -> float:
    """WikiText-2 perplexity on the first PPL_WINDOWS windows (resumable, see pipeline/perplexity.py)."""
    from pipeline.api import load
    from runtime.text.datasets import load_dataset
    from pipeline.perplexity import perplexity, state_path
    llm = load(str(path))
    ids = llm.tokenizer.encode(load_dataset("wikitext2"))
    return perplexity(llm.model, ids, PPL_SEQLEN, PPL_WINDOWS, state_path(llm.path, ids, PPL_SEQLEN))["ppl"]


def perplexity_llama_cpp(path: Path, threads: int) -> float:
    """The same perplexity from llama.cpp's logits on the same windows, in its own process; cached by file."""
    import numpy as np
    from runtime.checkpoints.atomic import write_text
    from runtime.text.datasets import load_dataset
    from runtime.text.tokenizer import Tokenizer
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = CACHE / "perplexity" / f"{path.name}.{PPL_WINDOWS}x{PPL_SEQLEN}.{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())["ppl"]
    ids = Tokenizer.load(path).encode(load_dataset("wikitext2"))
    windows = np.asarray(ids[:PPL_WINDOWS * PPL_SEQLEN], np.int32).reshape(PPL_WINDOWS, PPL_SEQLEN)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "windows.npy", windows)
        result = run_json([sys.executable, str(PROJECT / "bench_llamacpp.py"), "perplexity", str(path),
                           "--windows", str(Path(tmp) / "windows.npy"), "--threads", str(threads)], LLAMA_CPP, threads)
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_text(cached, json.dumps(result))
    return result["ppl"]


def export_comparison(threads: int) -> str:
    """A BENCHMARKS.md section: WikiText-2 perplexity (PPL_WINDOWS windows of PPL_SEQLEN) of SmolLM2 in llama.cpp
    as our gptq4g32sym exported to GGUF (Q4_0 blocks; built and exported first when missing) and as llama.cpp's
    own Q4_0 requantized from the Q4_1 base, with the base and our runtime on the GPTQ model for reference."""
    from pipeline.first_use import find_or_build
    from runtime.checkpoints.export import default_destination, export_model
    tag = "gptq4g32sym"
    ours = find_or_build(f"{SMOLLM}.{tag}")
    exported = default_destination(ours, "gguf")
    if not exported.exists():
        export_model(ours, "gguf")
    base = prepare(Row(LLAMA_CPP, SMOLLM, "Q4_1"), threads)
    requantized = CACHE / f"{SMOLLM}.Q4_0-from-Q4_1.gguf"
    if not requantized.exists():
        requantized.parent.mkdir(parents=True, exist_ok=True)
        run_json([sys.executable, str(PROJECT / "bench_llamacpp.py"), "quantize", str(base), str(requantized),
                  "Q4_0"], LLAMA_CPP, threads)
    rows = [(f"llama.cpp on our `{tag}` exported (`quantize.py --export gguf`)", exported),
            ("llama.cpp on its own Q4_0 (`llama_model_quantize` of the Q4_1 file)", requantized),
            ("llama.cpp on the Q4_1 base both start from", base)]
    lines = ["| model | bits/weight | WikiText-2 ppl |", "|---|---:|---:|"]
    for label, path in rows:
        print(f"perplexity of {path.name} in llama.cpp ...", flush=True)
        lines.append(f"| {label} | {gguf_bits(path):.2f} | {perplexity_llama_cpp(path, threads):.2f} |")
    print(f"perplexity of {ours.name} in our runtime ...", flush=True)
    lines.append(f"| our runtime on `{tag}` | {size_info(Row(OURS, SMOLLM, tag), ours)['bits']:.2f} | "
                 f"{perplexity_ours(ours):.2f} |")
    return "\n".join(["## GPTQ export in llama.cpp", "",
                      f"From `python bench.py --export-comparison --threads {threads}` on {machine()}: SmolLM2-135M-"
                      f"Instruct, WikiText-2 test, the first {PPL_WINDOWS} windows of {PPL_SEQLEN} tokens. Both Q4_0 "
                      "files hold the same 4-bit blocks of 32 with one scale each; ours chooses the codes with GPTQ "
                      "from the float model, llama.cpp rounds the Q4_1 file's weights to nearest.", "", *lines, ""])


# ---- the tables ----

def medians(results: list[dict]) -> dict:
    """Median of each measured quantity over the rounds, and the decode range (min, max)."""
    out = {key: statistics.median(r[key] for r in results) for key in results[0]}
    out["decode_range"] = (min(r["decode"] for r in results), max(r["decode"] for r in results))
    return out


def ratio(a: float | None, b: float | None) -> str:
    """a / b as "1.23x", empty when either is missing."""
    return f"{a / b:.2f}x" if a and b else ""


def row_cells(row: Row, stats: dict, measured: dict) -> dict:
    """The table cells of `row` from its medians (`stats`) and the other rows' (`measured`: {Row: stats})."""
    ref_row = reference(row)
    ref = measured.get(ref_row) if ref_row else None
    base = measured.get(Row(OURS, row.base, FLOAT))
    low, high = stats["decode_range"]
    return {
        "model": row.label,
        "bits/weight": f"{stats['bits']:.3f}",
        "file MB": f"{stats['file_mb']:.1f}",
        "WikiText-2 ppl": f"{stats['ppl']:.3f}" if stats.get("ppl") else "",
        "prefill tok/s": f"{stats['prefill']:.1f}",
        "decode tok/s": f"{stats['decode']:.1f}",
        "decode min-max": f"{low:.1f}-{high:.1f}",
        "sampled decode tok/s": f"{stats['sampled']:.1f}" if stats.get("sampled") else "",
        "decode vs our float": ratio(stats["decode"], base["decode"]) if base and row.engine == OURS else "",
        "llama.cpp row": ref_row.kind if ref else "",
        "decode vs llama.cpp": ratio(stats["decode"], ref["decode"]) if ref else "",
        "prefill vs llama.cpp": ratio(stats["prefill"], ref["prefill"]) if ref else "",
        "peak RSS MB": f"{stats['rss']:.0f}",
        "RSS after import MB": f"{stats['import_rss']:.0f}",
        "RSS after first kernel MB": f"{stats['jit_rss']:.0f}" if stats.get("jit_rss") else "",
        "RSS vs llama.cpp": f"{stats['rss'] / ref['rss']:.2f}" if ref else "",
        "quantize s": f"{stats['quant_s']:.1f}" if stats.get("quant_s") else "",
    }


def table(rows: list[Row], measured: dict) -> str:
    """A markdown table of `rows`; a column that is empty for every row is left out."""
    cells = [row_cells(row, measured[row], measured) for row in rows]
    headers = [h for h in cells[0] if any(c[h] for c in cells)]
    lines = ["| " + " | ".join(headers) + " |", "| --- |" + " ---: |" * (len(headers) - 1)]
    lines += ["| " + " | ".join(c[h] for h in headers) + " |" for c in cells]
    return "\n".join(lines)


def anchor_check(rows: list[Row], measured: dict) -> str:
    """llama.cpp's rows timed by our clock beside its own counters (llama_perf_context) of the same runs."""
    lines = ["| llama.cpp row | prefill tok/s (our clock) | prefill tok/s (llama_perf) | decode tok/s (our clock) | "
             "decode tok/s (llama_perf) |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if row.engine == LLAMA_CPP:
            s = measured[row]
            lines.append(f"| {row.name} | {s['prefill']:.1f} | {s['perf_prefill']:.1f} | {s['decode']:.1f} | "
                         f"{s['perf_decode']:.1f} |")
    return "\n".join(lines)


def machine() -> str:
    """CPU model, cores, its vector extensions and the software versions of our side."""
    import numba
    import numpy as np
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   platform.processor())
    vector = sorted(flag for flag in cpu_flags() if flag.startswith(("avx", "amx")) or flag in ("fma", "f16c"))
    return (f"{cpu}, {os.cpu_count()} cores ({' '.join(vector) or 'no x86 vector flags'}), Linux "
            f"{platform.release()}, Python {platform.python_version()}, NumPy {np.__version__}, Numba {numba.__version__}")


def plot(rows: list[Row], measured: dict, path: Path) -> None:
    """Perplexity against bits per weight of the SmolLM2 rows, one colour per method; float as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.set_prop_cycle(color=plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2])
    families = {}
    for row in rows:
        if row.base == SMOLLM and measured[row].get("ppl"):
            family = row.name if row.engine == LLAMA_CPP else FLOAT if row.kind == FLOAT else tag_method(row.kind)
            families.setdefault(family, []).append(row)
    for family, members in families.items():
        points = [(row, measured[row]) for row in members]
        if family == FLOAT:
            ax.axhline(points[0][1]["ppl"], color="gray", linestyle="--", linewidth=1, label="float (32 bits)")
            continue
        dots = ax.scatter([s["bits"] for _, s in points], [s["ppl"] for _, s in points], label=family, s=22)
        for row, s in points:
            ax.annotate(row.kind if row.engine == OURS else row.name, (s["bits"], s["ppl"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points", color=dots.get_facecolor()[0])
    ax.set_xlabel("bits per weight (decoder projections, side data included)")
    ax.set_ylabel(f"WikiText-2 perplexity ({PPL_WINDOWS} x {PPL_SEQLEN})")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M-Instruct: perplexity against size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def section_text(base: str, record: dict) -> str:
    """The BENCHMARKS.md section of one model family: the run that measured it (command, date, machine, load,
    llama.cpp build), its table and llama.cpp's own counters of its llama.cpp rows."""
    rows, measured = record_rows(record)
    llama = record.get("llama_cpp")
    llama_text = (f"llama-cpp-python {llama['version']} (`make bench` builds it from source with the CMAKE_ARGS "
                  f"of `python bench_llamacpp.py cmake-args`, here `{record['cmake_args']}`); its "
                  f"`llama_print_system_info()`: `{llama['system_info']}`"
                  if llama else "llama-cpp-python is not installed: no llama.cpp rows")
    lines = [f"### {SECTIONS[base]}", "",
             f"Measured by `{record['command']}` on {record['date']}: {record['rounds']} rounds, "
             f"{record['threads']} threads, {record['steps']} decode steps. Machine: {record['machine']}; load "
             f"average (1/5/15 minutes) {record['load']}. llama.cpp: {llama_text}." +
             (f" {record['note']}" if record.get("note") else ""), "",
             table(rows, measured), ""]
    if any(row.engine == LLAMA_CPP for row in rows):
        lines += ["llama.cpp's own timing of the same runs (`llama_perf_context`: prompt eval and eval times), "
                  "medians over the rounds, beside our clock's:", "", anchor_check(rows, measured), ""]
    return "\n".join(lines)


def document(records: dict) -> str:
    """The text of BENCHMARKS.md from the saved run of each model family (`load_records`)."""
    return "\n".join([
        "# Benchmarks", "",
        "Written by `bench.py` (`make bench`). Each model family's table comes from one run, named above it with "
        "its date, machine and llama.cpp build: a run rewrites the sections whose rows it measured in full and "
        "keeps the others (the results of each under benchmarks/speed/). Machines differ between runs; compare "
        "ratios within a table, not numbers across tables of different runs. The dated notes of side-by-side runs "
        "between full tables, each with its command: [benchmarks/history.md](benchmarks/history.md).", "",
        "How: each measurement is a fresh process running one engine with its own defaults. Ours "
        "(`bench.py --child`) imports `runtime`, which sets OPENBLAS_NUM_THREADS=1 for itself, with "
        "NUMBA_NUM_THREADS set to the run's thread count and no OMP_WAIT_POLICY; llama.cpp (`bench_llamacpp.py`) "
        "runs in an environment without those variables (nor any NUMBA_*), with n_threads = n_threads_batch = the "
        f"same count. Both prefill the same {PREFILL_TOKENS} tokens of WikiText-2 test (our tokenizer's ids, given "
        "to both), then decode the run's number of tokens greedily (argmax of the last logits each step), after a "
        "warm-up on the first 16 tokens. Sampled decode (ours): the same prompt through run.py's generation loop "
        "with its default sampling (temperature 0.7, top-k 50, top-p 0.9, seed 0), as many tokens, each decode "
        "step timed with the sampling of its token; llama.cpp's greedy loop above samples nothing. Every row is "
        "measured once per round and the rounds interleave the rows; the tables give the median over the rounds "
        "(decode min-max: the range over the rounds). Peak RSS: VmHWM of the measuring process; RSS after import: "
        "its VmRSS after importing the engine (ours: `pipeline.api`, NumPy and Numba; llama.cpp: `llama_cpp`), "
        "before any model, the floor of the Python process; RSS after first kernel (ours): its VmRSS after one "
        "cached Numba kernel has run, still before any model (Numba's compiler context and LLVM's code pages load "
        "with the first kernel, cached or not). Ratios are to the llama.cpp row of the same model and size "
        "(column llama.cpp row) and to our float row, from the medians of the same run.", "",
        "All rows: `make bench`. One family: `python bench.py --rows 'tinyllama*'` (shell patterns of the row "
        "names below; the llama.cpp rows a row is compared with come along). A quick look that writes nothing: "
        "`python bench.py --rows 'tinyllama-1.1b.rtn*,smollm2-135m.q*' --rounds 1 --steps 16 --no-perplexity "
        "--no-write`.", "",
        f"Bits per weight: decoder projections, from the stored bytes (codes plus scales, zeros, statistics, "
        f"outliers, signs; for a GGUF its blk.* matrices). Perplexity (SmolLM2 only): WikiText-2 test, first "
        f"{PPL_WINDOWS} windows of {PPL_SEQLEN} tokens; llama.cpp's from its logits on the same windows.", "",
        "The 1B-class rows have random weights (bench_models.py; speed does not depend on the values), built "
        "once under .cache/bench/: float32 normal(0, 0.02) weights, RTN / NF4 / int8 quantized from them, and "
        "for GPTQ, SpQR, QuIP and QuIP# (whose Hessian-based quantization takes long at this size) packed codes "
        "drawn at random in the format's valid range, labelled \"random codes\". The Llama is converted to an "
        "F16 GGUF with Llama 2's SentencePiece vocabulary (TinyLlama's) and quantized by llama.cpp's own "
        "`llama_model_quantize`. llama.cpp has no OPT architecture, so the OPT rows have no llama.cpp anchor.", "",
        *(section_text(base, record) for base, record in records.items()),
        "![perplexity against bits per weight](benchmarks.png)", "", *linked_sections(), *gpu_section()])


def readme_tables(records: dict) -> str:
    """The README's benchmark tables: each family's heading, the run it comes from and its table."""
    parts = []
    for base, record in records.items():
        parts += [f"### {SECTIONS[base]}", "", f"From `{record['command']}` on {record['date']} "
                  "([BENCHMARKS.md](BENCHMARKS.md): the machine, llama.cpp's build and its own counters).", "",
                  table(*record_rows(record)), ""]
    return "\n".join(parts)


def record_rows(record: dict) -> tuple[list[Row], dict]:
    """(rows, {Row: stats}) of a saved section."""
    measured = {}
    for entry in record["rows"]:
        stats = dict(entry)
        row = Row(stats.pop("engine"), stats.pop("base"), stats.pop("kind"))
        measured[row] = stats
    return list(measured), measured


def section_record(base: str, rows: list[Row], measured: dict, run: dict) -> dict:
    """What a run saves of one model family: the run's description (command, date, machine, load, threads, steps,
    rounds, llama_cpp, cmake_args; a record may add a `note` shown with them) and each of the family's rows with
    its stats."""
    return {**run, "rows": [{"engine": row.engine, "base": row.base, "kind": row.kind, **measured[row]}
                            for row in rows if row.base == base]}


def run_records(rows: list[Row], measured: dict, run: dict) -> dict:
    """{family: record} of the families that `rows` measured, in table order (`section_record`)."""
    return {base: section_record(base, rows, measured, run) for base in SECTIONS if any(row.base == base for row in rows)}


def save_records(records: dict, directory: Path) -> None:
    """Write each family's record to `directory`/<family>.json, leaving the other families' files."""
    from runtime.checkpoints.atomic import write_text
    directory.mkdir(parents=True, exist_ok=True)
    for base, record in records.items():
        write_text(directory / f"{base}.json", json.dumps(record, indent=1))


def load_records(directory: Path) -> dict:
    """{family: record} of the saved sections, in table order."""
    return {base: json.loads((directory / f"{base}.json").read_text()) for base in SECTIONS
            if (directory / f"{base}.json").is_file()}


def check_whole_sections(rows: list[Row], with_llama_cpp: bool) -> None:
    """UserError when `rows` hold part of a family's rows: a written section comes from one run, whole."""
    from runtime.errors import UserError
    for base in SECTIONS:
        family = [row for row in default_rows() if row.base == base and (with_llama_cpp or row.engine != LLAMA_CPP)]
        missing = [row.name for row in family if row not in rows]
        if missing and len(missing) < len(family):
            raise UserError(f"--rows measures part of the {base} rows (not {', '.join(missing[:3])}"
                            f"{', ...' if len(missing) > 3 else ''}): a written table comes whole from one run; "
                            f"select all of them (--rows '{base}*') or add --no-write")


LINKED = (  # BENCHMARKS.md sections that link a file of benchmarks/ another command writes: title, file, what, command
    ("Accuracy of the integer-activation kernels", "activations.md", "WikiText-2 perplexity of each format and bit "
     "width under float activations, the integer prefill kernels and the integer decode kernels",
     "python bench_activations.py"),
    ("QLoRA training", "training.md", "Training throughput, peak memory and fine-tuned perplexity of ours and of "
     "PEFT + torch", "python bench_training.py --quality"),
    ("Build time and memory at 1.3B", "build.md", "Build time and peak RSS of quantizing a 1.3B checkpoint, per "
     "method measured, against the I/O and calibration floors, one table per window count (each names its "
     "command)", "python bench_build.py --nsamples N"))


def linked_sections() -> list[str]:
    """BENCHMARKS.md's sections for the benchmarks other commands write under benchmarks/ (not part of
    `make bench`, whose rows they do not touch): a link to each file that exists."""
    lines = []
    for title, name, what, command in LINKED:
        if (PROJECT / "benchmarks" / name).exists():
            lines += [f"## {title}", "", f"{what}: [benchmarks/{name}](benchmarks/{name}), written by `{command}`.", ""]
    return lines


def gpu_section() -> list[str]:
    """BENCHMARKS.md's GPU section: links to the results `tests/gpu_check.sh` wrote on a GPU machine and
    that were committed under benchmarks/ (GPU runs happen on lent machines, not in `make bench`)."""
    runs = sorted((PROJECT / "benchmarks").glob("gpu-*.md"))
    if not runs:
        return []
    return ["## GPU", "", "Measured by `bash tests/gpu_check.sh DIR` (`make gpu-check OUT=DIR`) on a machine with "
            "an NVIDIA GPU; each run's tables, versions and findings:", "",
            *[f"- [{run.stem}](benchmarks/{run.name}): {run.read_text(encoding='utf-8').splitlines()[0][2:]}"
              for run in runs], ""]


def update_readme(readme: Path, tables: str) -> None:
    """Replace the README's benchmark tables (between the markers) with `tables`."""
    from runtime.checkpoints.atomic import write_text
    from runtime.errors import UserError
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise UserError(f"{readme} lacks the markers {README_START} ... {README_END} around its benchmark tables")
    head, _, rest = text.partition(README_START)
    write_text(readme, head + README_START + "\n\n" + tables + "\n" + README_END + rest.partition(README_END)[2])


def load_average() -> str:
    """The machine's load averages over 1, 5 and 15 minutes."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def check_args(args) -> None:
    """UserError for a count below 1."""
    from runtime.errors import UserError
    for name in ("rounds", "steps", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")


def llama_cpp_settings(threads: int) -> dict | None:
    """llama-cpp-python's version and build flags, or None when it is not installed."""
    try:
        return run_json([sys.executable, str(PROJECT / "bench_llamacpp.py"), "info"], LLAMA_CPP, threads)
    except RuntimeError:
        return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=None,
                   help="comma-separated shell patterns of row names (default: all), e.g. "
                        f"'{SMOLLM},{SMOLLM}.rtn4g128,{LLAMA_1B}.rtn*'; their llama.cpp rows are added")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=64, help="greedy decode steps per measurement")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-perplexity", action="store_true", help="speed and memory only (SmolLM2's perplexity "
                   "takes minutes per row the first time)")
    p.add_argument("--no-write", action="store_true", help="print the tables; leave BENCHMARKS.md and README alone")
    p.add_argument("--prepare-only", action="store_true", help="build the models, GGUFs and perplexities the rows "
                   "need, then stop (each is kept: an interrupted preparation continues where it stopped)")
    p.add_argument("--export-comparison", action="store_true", help="print the section comparing our GPTQ export "
                   "(GGUF Q4_0) with llama.cpp's own Q4_0 in llama.cpp's perplexity, then stop")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child_ours(args.child, [int(t) for t in args.ids.split(",")], args.steps)))
        return
    check_args(args)
    if args.export_comparison:
        print(export_comparison(args.threads))
        return
    load = load_average()
    llama = llama_cpp_settings(args.threads)
    rows = [row for row in select(default_rows(), args.rows) if llama is not None or row.engine != LLAMA_CPP]
    if not (args.no_write or args.prepare_only):
        check_whole_sections(rows, llama is not None)
    paths = {row: prepare(row, args.threads) for row in rows}
    measured = {row: size_info(row, paths[row]) for row in rows}
    ids = {base: prompt_ids(prepare(Row(OURS, base, FLOAT), args.threads)) for base in {row.base for row in rows}}
    for row in rows:
        if row.base == SMOLLM and not args.no_perplexity:
            print(f"perplexity of {row.name} ...", flush=True)
            measured[row]["ppl"] = (perplexity_llama_cpp(paths[row], args.threads) if row.engine == LLAMA_CPP
                                    else perplexity_ours(paths[row]))
    if args.prepare_only:
        print(f"prepared {len(rows)} rows", flush=True)
        return
    runs = {row: [] for row in rows}
    for round_, row in schedule(rows, args.rounds):
        result = run_json(measure_command(row, paths[row], ids[row.base], args.steps, args.threads), row.engine,
                          args.threads)
        runs[row].append(result)
        print(f"round {round_ + 1}/{args.rounds} {row.label}: prefill {result['prefill']:.1f} tok/s, decode "
              f"{result['decode']:.1f} tok/s, peak RSS {result['rss']:.0f} MB", flush=True)
    for row in rows:
        measured[row].update(medians(runs[row]))
    run = {"command": shlex.join(["python", "bench.py"] + (sys.argv[1:] if argv is None else argv)),
           "date": time.strftime("%Y-%m-%d"), "machine": machine(),
           "load": f"{load} when the run started and {load_average()} when it ended", "threads": args.threads,
           "steps": args.steps, "rounds": args.rounds, "llama_cpp": llama,
           "cmake_args": cmake_args(cpu_flags(), platform.machine())}
    if args.no_write:
        print(document(run_records(rows, measured, run)))
        return
    import filelock
    from runtime.checkpoints.atomic import write_text
    CACHE.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(CACHE / "write.lock"):  # another run's records saved meanwhile are in what it writes
        save_records(run_records(rows, measured, run), SECTION_DIR)
        records = load_records(SECTION_DIR)
        text = document(records)
        write_text(PROJECT / "BENCHMARKS.md", text)
        update_readme(PROJECT / "README.md", readme_tables(records))
        if any(measured[row].get("ppl") for row in rows if row.base == SMOLLM):
            plot(rows, measured, PROJECT / "benchmarks.png")
    print(text)


if __name__ == "__main__":
    import runtime  # noqa: F401  (its thread defaults before NumPy loads, in the parent as in the children)
    from runtime.cli import run_cli
    run_cli(main)
