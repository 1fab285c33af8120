"""The llama.cpp side of the benchmark (llama-cpp-python), run by bench.py as its own process.

bench.py starts this file with an environment stripped of the variables our
runtime sets for itself (OMP_WAIT_POLICY, OPENBLAS_NUM_THREADS, NUMBA_*), so
llama.cpp runs with its own defaults; the thread count is llama.cpp's own
n_threads / n_threads_batch. It never imports our runtime. Each command
prints one JSON object on stdout:

    python bench_llamacpp.py measure GGUF --ids 1,2,3 --steps 64 --threads 2
        prefill the ids, then greedy decode `steps` tokens, after a warm-up;
        tokens/s from our clock and from llama.cpp's own counters (llama_perf),
        peak RSS (VmHWM) and the RSS after `import llama_cpp`
    python bench_llamacpp.py perplexity GGUF --windows FILE.npy --threads 2
        NLL of every predicted token of each window ([n, seqlen] int32 ids)
    python bench_llamacpp.py quantize SRC DST TYPE      llama_model_quantize (TYPE: Q4_0, Q2_K, Q8_0, ...;
                                                        a quantized SRC is requantized)
    python bench_llamacpp.py info                        version and build flags (llama_print_system_info)
    python bench_llamacpp.py cmake-args                  CMAKE_ARGS to build llama-cpp-python for this CPU

`cmake-args` is for `make bench`: a source build of llama-cpp-python with
GGML_NATIVE compiles for the host with -march=native, which turns on AMX where
the CPU has it, and AMX faults on some virtual machines; these arguments name
the host's x86 features one by one instead and keep every GGML_AMX_* off.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

# /proc/cpuinfo flag -> llama.cpp's CMake option (ggml/CMakeLists.txt); GGML_AVX512 needs all five of its flags
X86_FEATURES = {"sse4_2": "GGML_SSE42", "f16c": "GGML_F16C", "fma": "GGML_FMA", "bmi2": "GGML_BMI2",
                "avx": "GGML_AVX", "avx2": "GGML_AVX2", "avx_vnni": "GGML_AVX_VNNI",
                "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
                "avx512_bf16": "GGML_AVX512_BF16"}
AVX512_BASE = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
AMX_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def cmake_args(cpu_flags: set[str], machine: str) -> str:
    """CMAKE_ARGS for llama-cpp-python on a CPU with `cpu_flags` (/proc/cpuinfo): on x86 each feature named
    (no -march=native) and AMX off; elsewhere the native build. Never the multimodal library (unused here)."""
    if machine not in ("x86_64", "AMD64", "i686"):
        return "-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON"
    options = {option: flag in cpu_flags for flag, option in X86_FEATURES.items()}
    options["GGML_AVX512"] = all(flag in cpu_flags for flag in AVX512_BASE)
    options.update({option: False for option in AMX_OFF})
    return " ".join(["-DLLAVA_BUILD=OFF", "-DGGML_NATIVE=OFF"] + [f"-D{k}={'ON' if v else 'OFF'}" for k, v in sorted(options.items())])


def cpu_flags() -> set[str]:
    """The feature flags of this machine's first CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def status_mb(key: str) -> float:
    """A size from /proc/self/status in MB (VmHWM: peak RSS, VmRSS: current RSS)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))


def open_model(path: str, threads: int, n_ctx: int, logits_all: bool = False):
    """(llama_cpp module, Llama) with `threads` threads for decode and prefill; the prompt goes in one batch."""
    import llama_cpp
    llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                          n_threads_batch=threads, logits_all=logits_all, verbose=False)
    return llama_cpp, llm


def next_token(llama_cpp, llm, np) -> int:
    """The argmax of the logits of the last token evaluated (Llama.scores holds them only with logits_all)."""
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))  # [vocab]
    return int(np.argmax(logits))


def measure(path: str, ids: list[int], steps: int, threads: int) -> dict:
    """Prefill `ids`, then `steps` greedy decode steps (argmax of the last logits each step), after a warm-up."""
    import llama_cpp  # noqa: F401  (measured: the RSS of the engine before any model)
    import numpy as np
    import_rss = status_mb("VmRSS")
    llama_cpp, llm = open_model(path, threads, n_ctx=max(512, len(ids) + steps + 1))
    llm.eval(ids[:16])
    llm.eval([next_token(llama_cpp, llm, np)])
    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    start = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        llm.eval([next_token(llama_cpp, llm, np)])
    decode = time.perf_counter() - start
    perf = llama_cpp.llama_perf_context(llm.ctx)
    return {"prefill": len(ids) / prefill, "decode": steps / decode, "rss": status_mb("VmHWM"),
            "import_rss": import_rss, "perf_prefill": perf.n_p_eval / (perf.t_p_eval_ms / 1e3),
            "perf_decode": perf.n_eval / (perf.t_eval_ms / 1e3)}


def perplexity(path: str, windows_file: str, threads: int) -> dict:
    """Sum and count of the NLL of every predicted token of each window, from llama.cpp's logits."""
    import numpy as np
    windows = np.load(windows_file)  # [n, seqlen] int32
    llama_cpp, llm = open_model(path, threads, n_ctx=windows.shape[1], logits_all=True)
    nll, count = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval([int(t) for t in window])
        logits = np.asarray(llm.scores[:len(window) - 1], dtype=np.float64)  # [T-1, vocab]
        top = logits.max(axis=1, keepdims=True)  # [T-1, 1]
        log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]  # [T-1]
        nll += float((log_z - logits[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    return {"nll": nll, "count": count, "ppl": float(np.exp(nll / count))}


def quantize(source: str, target: str, kind: str) -> dict:
    """Quantize GGUF `source` to `target` with llama.cpp's own quantizer (written beside, then renamed); a
    `source` that is itself quantized (SmolLM2's Q4_1) is requantized (llama-quantize's --allow-requantize)."""
    import llama_cpp
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}", None)
    if ftype is None:
        raise SystemExit(f"llama.cpp has no file type MOSTLY_{kind}: use Q4_0, Q2_K, Q8_0, F16, ...")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    tmp = f"{target}.{os.getpid()}.tmp"
    start = time.perf_counter()
    try:
        if llama_cpp.llama_model_quantize(source.encode(), tmp.encode(), params) != 0:
            raise SystemExit(f"llama_model_quantize failed on {source} -> {kind}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"seconds": time.perf_counter() - start, "bytes": os.path.getsize(target)}


def info() -> dict:
    """llama-cpp-python's version and llama.cpp's build flags as it prints them."""
    import llama_cpp
    return {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode().strip()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="command", required=True)
    m = commands.add_parser("measure")
    m.add_argument("gguf")
    m.add_argument("--ids", required=True, help="comma-separated prompt token ids")
    m.add_argument("--steps", type=int, required=True)
    m.add_argument("--threads", type=int, required=True)
    q = commands.add_parser("perplexity")
    q.add_argument("gguf")
    q.add_argument("--windows", required=True)
    q.add_argument("--threads", type=int, required=True)
    z = commands.add_parser("quantize")
    z.add_argument("source")
    z.add_argument("target")
    z.add_argument("type")
    commands.add_parser("info")
    commands.add_parser("cmake-args")
    args = p.parse_args(argv)
    if args.command == "cmake-args":
        print(cmake_args(cpu_flags(), platform.machine()))
        return
    if args.command == "measure":
        result = measure(args.gguf, [int(t) for t in args.ids.split(",")], args.steps, args.threads)
    elif args.command == "perplexity":
        result = perplexity(args.gguf, args.windows, args.threads)
    elif args.command == "quantize":
        result = quantize(args.source, args.target, args.type)
    else:
        result = info()
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
