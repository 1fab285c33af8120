"""GPU benchmark (`--device cuda`): each format's matmul at Llama-2-7B's layer shapes, and end-to-end decode.

    python bench_gpu.py --out DIR [--quick] [--no-kernels]

(a) Kernel: y = x @ W.T through each format's `matmul` (every kernel the
    product launches: input gather, activation quantization, the product) for
    x of 1, 4 and 16 rows at the shapes of Llama-2-7B's projections (q/k/v/o
    4096x4096, gate/up 11008x4096, down 4096x11008), beside cuBLAS float16 on
    the same shape. Time per call is GPU time from CUDA events with the
    launch queue filled first (a spin kernel holds the GPU while the CPU
    enqueues the calls, so Python's launch latency is not counted; the CPU's
    own time per call is reported beside it). Each call multiplies the next
    of enough copies of the weight to fill three times the GPU's L2 cache, so
    the weights come from HBM as in a model's forward pass, not from L2. GB/s
    counts the stored bytes of the weight (codes and side data) read once per
    call, and the fraction of peak is against the datasheet's 4.8 TB/s of the
    H200 and against a device-to-device copy measured in the same run.
(b) End to end: a random-weight Llama with TinyLlama-1.1B's shapes, float16
    and float32 weights against each packed format: greedy decode of 64
    tokens after a 16-token prompt (the argmax of each step comes back to
    the host, as generation does), and prefill of 512 tokens (the median
    of three after a warm one of the same length). Decode runs
    as a CUDA graph per step where the model's weights allow it
    (runtime/cuda_graph_step.py, the default; QuIP's weights do not); the
    float16 and 4-bit rows are also measured op by op.

Weights are random (bench_models.py: packed codes drawn in each format's
valid range, every layer its own copy on the device); speed does not depend
on the values. Writes DIR/bench_gpu.json and DIR/bench_gpu.md.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

import bench_models
from model import Config, Model
from runtime import cuda_graph_step

H200_PEAK_GBS = 4800.0  # H200 datasheet HBM3e bandwidth
SHAPES_7B = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
BATCHES = (1, 4, 16)
KERNEL_FORMATS = ("rtn4g128", "rtn4g128sym", "gptq4g128act", "rtn3g128", "rtn2g64", "rtn8", "nf4", "nf4dq",
                  "int8", "smooth8", "spqr3", "quip2", "quipsharp2", "quipsharp3", "quipsharp4")
MODEL_FORMATS = ("rtn4g128", "rtn2g64", "nf4", "int8", "spqr3", "quip2", "quipsharp2", "quipsharp4")
EAGER_ROWS = ("float16", "rtn4g128")  # also measured without the CUDA graph
L2_COPIES = 3  # each weight's copies fill this many times the L2 cache
TIMED_SECONDS = 0.05  # about this much GPU time per (format, shape, batch) row
PREFILL_ROUNDS = 3  # prefill tokens/s: the median of this many prefills after one at full length
SPIN_SOURCE = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {}
}
"""


def device_info(cp) -> dict:
    """Name, memory, clocks and versions of the GPU and CuPy."""
    props = cp.cuda.runtime.getDeviceProperties(0)
    return {"gpu": props["name"].decode(), "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
            "sm_count": props["multiProcessorCount"], "clock_mhz": props["clockRate"] // 1000,
            "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(), "cuda_driver": cp.cuda.runtime.driverGetVersion(),
            "cupy": cp.__version__, "numpy": np.__version__, "python": platform.python_version()}


class GpuTimer:
    """GPU time per call of a function, with the launch queue filled behind a spin kernel."""

    def __init__(self, cp):
        self.cp = cp
        self.spin = cp.RawKernel(SPIN_SOURCE, "spin")
        self.cycles_per_ms = cp.cuda.runtime.getDeviceProperties(0)["clockRate"]  # kHz = cycles per ms

    def time(self, fn, max_calls: int) -> tuple[float, float]:
        """(GPU ms per call, CPU ms per call) over at most `max_calls` warm calls (fewer for slow calls: about
        TIMED_SECONDS in all, at least three)."""
        cp = self.cp
        fn()
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        fn()
        cp.cuda.Device().synchronize()
        calls = max(3, min(max_calls, int(TIMED_SECONDS / max(time.perf_counter() - t0, 1e-6))))
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        cpu_ms = (time.perf_counter() - t0) * 1e3 / calls  # enqueue rate (plus any host syncs)
        cp.cuda.Device().synchronize()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        self.spin((1,), (1,), (np.int64(self.cycles_per_ms * (2 * cpu_ms * calls + 1)),))
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / calls, cpu_ms


def copy_bandwidth(cp, gib: float = 2.0) -> float:
    """Device-to-device copy GB/s (bytes read + written), the practical ceiling."""
    a = cp.empty(int(gib * 2**30) // 4, dtype=cp.float32)
    b = cp.empty_like(a)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    b[...] = a
    start.record()
    for _ in range(5):
        b[...] = a
    end.record()
    end.synchronize()
    return 2 * a.nbytes * 5 / (cp.cuda.get_elapsed_time(start, end) / 1e3) / 1e9


def in_parallel(fn, *arg_lists) -> list:
    """[fn(*args) for args in zip(*arg_lists)], one process per core (NumPy packing is single-threaded)."""
    with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(fn, *arg_lists))


def cycling(fns):
    """A function x -> the next of fns (in turn) applied to x."""
    turn = itertools.cycle(fns)
    return lambda x: next(turn)(x)


def kernel_rows(cp, timer: GpuTimer, formats, calls: int, log) -> list[dict]:
    """One row per (format, shape, batch): GPU µs per call, CPU µs per call, GB/s, fraction of peak; each call
    multiplies the next of enough copies of the weight that they do not fit the L2 cache."""
    l2_bytes = cp.cuda.Device().attributes["L2CacheSize"]
    copies = lambda nbytes: max(2, -(-L2_COPIES * l2_bytes // nbytes))
    rows = []
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    tasks = [(tag, shape) for shape in SHAPES_7B.values() for tag in formats]
    packed_all = dict(zip(tasks, in_parallel(bench_models.random_packed, *zip(*tasks))))
    log(f"  packed {len(tasks)} weights in {time.perf_counter() - t0:.1f} s")
    for label, shape in SHAPES_7B.items():
        n_out, n_in = shape
        xs = {m: cp.asarray(rng.standard_normal((m, n_in), dtype=np.float32)) for m in BATCHES}
        w16 = cp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(cp.float16)  # [out, in]
        w16s = [w16.copy() for _ in range(copies(w16.nbytes))]  # [out, in] each
        weights = [("cuBLAS fp16", w16.nbytes, cycling([lambda x, w=w: x.astype(cp.float16) @ w.T for w in w16s]))]
        for tag in formats:
            packed = packed_all.pop((tag, shape))
            on_gpu = [packed.to_device(cp) for _ in range(copies(packed.nbytes))]
            weights.append((tag, packed.nbytes, cycling([p.matmul for p in on_gpu])))
        for name, nbytes, fn in weights:
            for m, x in xs.items():
                gpu_ms, cpu_ms = timer.time(lambda: fn(x), calls)
                rows.append({"format": name, "shape": label, "out": n_out, "in": n_in, "batch": m,
                             "gpu_us": round(gpu_ms * 1e3, 2), "cpu_us": round(cpu_ms * 1e3, 2),
                             "weight_mb": round(nbytes / 1e6, 2), "gbs": round(nbytes / (gpu_ms / 1e3) / 1e9, 1),
                             "peak_fraction": round(nbytes / (gpu_ms / 1e3) / 1e9 / H200_PEAK_GBS, 3)})
        del weights, w16s, on_gpu
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def decode_and_prefill(cp, model: Model, steps: int, prefill_tokens: int) -> dict:
    """Greedy decode tokens/s (argmax to the host each step) and prefill tokens/s."""
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, model.config.vocab_size, 16).tolist()
    cache = model.new_cache(16 + steps + 1)
    token = int(model.prefill(prompt, cache).argmax())
    token = int(model.decode(token, cache).argmax())  # warm
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        token = int(model.decode(token, cache).argmax())
    decode_s = time.perf_counter() - t0
    ids = rng.integers(3, model.config.vocab_size, prefill_tokens).tolist()
    prefill_s = []
    for _ in range(PREFILL_ROUNDS + 1):  # the first at full length warms the kernels, cuBLAS and the memory pool
        cache = model.new_cache(prefill_tokens)
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        float(model.prefill(ids, cache)[0])
        prefill_s.append(time.perf_counter() - t0)
    return {"decode_tok_s": round(steps / decode_s, 1),
            "prefill_tok_s": round(prefill_tokens / float(np.median(prefill_s[1:])), 1)}


def model_rows(cp, shape_name: str, formats, steps: int, prefill_tokens: int, log, rows: list, on_row) -> None:
    """End-to-end rows of a random-weight model with the shapes of `shape_name`, appended to `rows`;
    `on_row()` after each (the results so far survive a time-out)."""
    hf = bench_models.hf_config(shape_name)
    config = Config.from_hf(hf)
    t0 = time.perf_counter()
    packed = in_parallel(bench_models.packed_tensors, [hf] * len(formats), formats)
    log(f"  packed {len(formats)} models in {time.perf_counter() - t0:.1f} s")
    builds = [("float16", lambda: bench_models.float_tensors(hf, dtype=np.float16)),
              ("float32", lambda: bench_models.float_tensors(hf))]
    builds += [(tag, lambda tensors=tensors: tensors) for tag, tensors in zip(formats, packed)]
    for name, build in builds:
        t0 = time.perf_counter()
        before = cp.get_default_memory_pool().used_bytes()
        model = Model(config, build(), cp)  # each layer's arrays copied to the GPU on their own
        used = cp.get_default_memory_pool().used_bytes() - before
        log(f"  {shape_name} {name}: built in {time.perf_counter() - t0:.1f} s, {used / 2**30:.2f} GiB on the GPU")
        graph_ok = cuda_graph_step.takes(model)  # else Model decodes op by op already
        for graph in (True, False) if name in EAGER_ROWS and graph_ok else (graph_ok,):
            model.decode_step = model.graph_decode_step if graph else model.unfused_decode_step
            rows.append({"model": shape_name, "weights": name, "decode": "graph" if graph else "op by op",
                         "gpu_gib": round(used / 2**30, 2), **decode_and_prefill(cp, model, steps, prefill_tokens)})
            log(f"    {rows[-1]}")
            on_row()
        del model
        gc.collect()  # Model holds bound methods of itself (a cycle): free its GPU arrays before the next row
        cp.get_default_memory_pool().free_all_blocks()


def markdown(info: dict, copy_gbs: float, kernels: list, models: list) -> str:
    """The results as BENCHMARKS.md's GPU section."""
    lines = [f"GPU: {info['gpu']} ({info['memory_gib']} GiB, {info['sm_count']} SMs), CUDA runtime "
             f"{info['cuda_runtime']}, driver {info['cuda_driver']}, CuPy {info['cupy']}, NumPy {info['numpy']}, "
             f"Python {info['python']}. Device-to-device copy measured {copy_gbs:.0f} GB/s (read + write); "
             f"peak fractions below are of the datasheet's {H200_PEAK_GBS:.0f} GB/s. Random weights (speed does "
             "not depend on the values; packed codes drawn in each format's range).", "",
             "Kernel: y = x @ W.T at Llama-2-7B shapes, GPU µs per call (CUDA events, launch queue pre-filled), "
             "GB/s of stored weight bytes, fraction of peak; CPU µs per call is Python's launch cost.", "",
             "| format | shape | batch | weight MB | GPU µs | GB/s | of peak | vs cuBLAS fp16 | CPU µs |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = {(r["shape"], r["batch"]): r["gpu_us"] for r in kernels if r["format"] == "cuBLAS fp16"}
    for r in kernels:
        speedup = base[(r["shape"], r["batch"])] / r["gpu_us"]
        lines.append(f"| {r['format']} | {r['shape']} {r['out']}x{r['in']} | {r['batch']} | {r['weight_mb']} | "
                     f"{r['gpu_us']} | {r['gbs']} | {r['peak_fraction']:.0%} | {speedup:.2f}x | {r['cpu_us']} |")
    lines += ["", "End to end (random-weight Llama with TinyLlama-1.1B's shapes): greedy decode after a 16-token "
              "prompt, each step a CUDA graph (or op by op), prefill of 512 tokens; vs float16: against float16 "
              "decoded the same way.", "",
              "| weights | decode | GPU GiB | decode tok/s | vs float16 | prefill tok/s |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    f16 = {r["decode"]: r["decode_tok_s"] for r in models if r["weights"] == "float16"}
    for r in models:
        ratio = f"{r['decode_tok_s'] / f16[r['decode']]:.2f}x" if r["decode"] in f16 else "-"
        lines.append(f"| {r['weights']} | {r['decode']} | {r['gpu_gib']} | {r['decode_tok_s']} | {ratio} | "
                     f"{r['prefill_tok_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for bench_gpu.json and bench_gpu.md")
    p.add_argument("--quick", action="store_true", help="fewer formats, calls and steps (a smoke run)")
    p.add_argument("--no-kernels", action="store_true", help="the end-to-end rows only (part b)")
    args = p.parse_args(argv)
    import cupy as cp

    log = lambda msg: print(msg, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    info = device_info(cp)
    log(f"bench_gpu: {info}")
    copy_gbs = copy_bandwidth(cp)
    log(f"device copy: {copy_gbs:.0f} GB/s")
    timer = GpuTimer(cp)
    kernel_formats = KERNEL_FORMATS[:3] if args.quick else KERNEL_FORMATS
    kernels = [] if args.no_kernels else kernel_rows(cp, timer, kernel_formats, 10 if args.quick else 100, log)
    write = lambda models: ((args.out / "bench_gpu.json").write_text(json.dumps(
        {"device": info, "copy_gbs": round(copy_gbs, 1), "kernels": kernels, "models": models}, indent=1)),
        (args.out / "bench_gpu.md").write_text(markdown(info, copy_gbs, kernels, models)))
    models = []
    write(models)  # the kernel table survives a time-out in the model part
    model_rows(cp, "tinyllama-1.1b", MODEL_FORMATS[:2] if args.quick else MODEL_FORMATS,
               8 if args.quick else 64, 64 if args.quick else 512, log, models, lambda: write(models))
    log(f"wrote {args.out / 'bench_gpu.json'} and {args.out / 'bench_gpu.md'}")


if __name__ == "__main__":
    main()
