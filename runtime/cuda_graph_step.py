"""A Llama decode step on the GPU, recorded once as a CUDA graph and replayed for every token.

Decoding on CuPy op by op launches about a thousand small kernels per token
from Python (about 25 µs each on the H200 run's host: benchmarks/gpu-h200.md),
so the GPU waits on Python whatever the weight format. Here one step is, per
layer: the residual add fused with RMSNorm, the q/k/v products (each format's
own CUDA kernels; float weights and a float head through
runtime/kernels/float_gemv.cu, since CuPy refuses cuBLAS calls during
stream capture), RoPE with the cache write, attention
over the cache, the o product, residual + RMSNorm, gate/up, SiLU·up, down
(runtime/kernels/llama_step.cu for the elementwise kernels). The token id and
its position live in device memory, so no launch depends on the position:
the step is captured once per KV cache (CuPy stream capture) and each token
is two small fills, one graph launch and a copy of the logits, as gpt-fast and
llama.cpp's CUDA backend do with their graphs.

The step allocates its temporaries during capture from a memory pool of its
own, kept as long as the graph, so nothing outside reuses that memory
between replays. The first call also runs the step once without capture (it
compiles the kernels and gives cuBLAS its workspace on this stream).
"""
from __future__ import annotations

import contextlib
import sys

from runtime.kernels import float_gemv_cuda
from runtime.kernels import llama_step_cuda as kernels
from runtime.linear import linear

LAYER_NAMES = ("input_layernorm", "post_attention_layernorm")


def takes(model) -> bool:
    """Whether `model` (on CuPy) decodes through a GraphStep: a Llama whose heads fit the attention kernel and
    whose weights are float arrays or packed formats whose products a graph can capture (`CUDA_GRAPH`)."""
    weights = [w for layer in model.layers for w in layer.values()] + [model.lm_head]
    return (model.config.arch == "llama" and model.config.head_dim <= kernels.MAX_HEAD_DIM
            and all(getattr(w, "CUDA_GRAPH", True) for w in weights))


def product(x, w, b=None):
    """y [out] = w x (+ b) for x [in]: the float GEMV kernel for a float CuPy weight, else the weight's own
    kernels (runtime.linear)."""
    if hasattr(w, "ndim") and float_gemv_cuda.takes(w):
        y = float_gemv_cuda.gemv(x, w)  # [out]
        if b is not None:
            y += b
        return y
    import cupy

    return cupy.ascontiguousarray(linear(x[None], w, b)[0])  # [out]


class GraphStep:
    """The decode step of `model` writing into `cache`, captured on the first call; `run(token, position)`."""

    def __init__(self, model, cache):
        import cupy

        self.model, self.cache, self.cupy = model, cache, cupy
        c = model.config
        self.stream = cupy.cuda.Stream()  # blocking: the default stream orders after it
        self.pool = cupy.cuda.MemoryPool()  # the captured step's temporaries
        self.token = cupy.zeros(1, dtype=cupy.int64)  # [1] the token id, read by the graph
        self.pos = cupy.zeros(1, dtype=cupy.int32)  # [1] its position
        self.cos, self.sin = model.rope_table(cache.max_len)  # [>= max_len, hd/2] each
        self.scores = cupy.empty((c.n_heads, cache.max_len), dtype=cupy.float32)  # [H, max_len] attend's scratch
        as_f32 = lambda w: cupy.ascontiguousarray(w, dtype=cupy.float32)
        self.norms = [[as_f32(w[f"{name}.weight"]) for name in LAYER_NAMES] for w in model.layers]  # [d] each
        self.final_norm = as_f32(model.globals["norm.weight"])  # [d]
        self.x = cupy.empty(c.hidden_size, dtype=cupy.float32)  # [d] the residual stream
        self.graph = None
        self.logits = None  # [vocab] the captured step's output

    def run(self, token: int, position: int):
        """Logits [vocab] (a new CuPy array) of `token` at `position`; its keys and values go into the cache."""
        cupy = self.cupy
        with self.stream:
            self.token.fill(token)
            self.pos.fill(position)
            if self.graph is None:
                self.capture()
            if self.graph is False:
                return self.step()
            self.graph.launch(self.stream)
            return self.logits.copy()

    def capture(self) -> None:
        """Run the step once, then record it as a graph (or, where capture fails, keep running it op by op)."""
        cupy = self.cupy
        self.step()  # compiles every kernel, sets up cuBLAS on this stream; rewrites nothing the graph reads
        self.stream.synchronize()
        with cupy.cuda.using_allocator(self.pool.malloc):
            self.stream.begin_capture()
            try:
                self.logits = self.step()
            except Exception as error:  # a launch that cannot be captured: decode without a graph
                with contextlib.suppress(Exception):  # the capture is over either way
                    self.stream.end_capture()
                self.graph = False
                print(f"warning: CUDA graph capture of the decode step failed ({error}); decoding op by op",
                      file=sys.stderr)
                return
            self.graph = self.stream.end_capture()

    def step(self):
        """One decode step as launches on the current stream; logits [vocab]."""
        cupy, model = self.cupy, self.model
        c, cache, eps = model.config, self.cache, model.config.norm_eps
        x = self.x
        x[...] = model.embed[self.token][0]  # [d]
        n = cupy.empty_like(x)  # [d] the normed stream
        y = None  # [d] what the residual stream adds before the next norm
        for i, (w, (norm_in, norm_post)) in enumerate(zip(model.layers, self.norms)):
            kernels.residual_rms_norm(x, y, norm_in, n, eps)
            q, k, v = (product(n, w[f"self_attn.{p}_proj.weight"], w.get(f"self_attn.{p}_proj.bias"))
                       for p in "qkv")  # [H*hd], [KV*hd] x 2
            kernels.rope_store(q, k, v, self.cos, self.sin, self.pos, cache.k[i], cache.v[i])
            o = cupy.empty_like(q)  # [H*hd]
            kernels.attend(q, cache.k[i], cache.v[i], self.pos, self.scores, o)
            y = product(o, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))  # [d]
            kernels.residual_rms_norm(x, y, norm_post, n, eps)
            gate, up = (product(n, w[f"mlp.{p}_proj.weight"]) for p in ("gate", "up"))  # [ffn] each
            s = cupy.empty_like(gate)  # [ffn]
            kernels.silu_mul(gate, up, s)
            y = product(s, w["mlp.down_proj.weight"])  # [d]
        kernels.residual_rms_norm(x, y, self.final_norm, n, eps)
        return product(n, model.lm_head)  # [vocab]
