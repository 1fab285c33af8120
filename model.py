"""Config and the hand-written forward passes of OPT and Llama, with a KV cache.

Follows the Hugging Face transformers reference implementations
(`modeling_opt.py`, `modeling_llama.py`) operation by operation, in float32
NumPy (or CuPy with `device="cuda"`), in the spirit of llama2.c's forward:

    prefill(tokens) / decode(token)      the two public passes, each with its own checks
      forward: embed_tokens -> block per layer        (decode: one token; prefill: T tokens)
        block: attention half, then MLP half           one pair of functions per architecture
          opt_attention_half | llama_attention_half    h = x + attention (OPT post-LN: norm after)
            attention                                  shared: q/k/v, RoPE, cache write, softmax
              attend_decode | attend_prefill           one query / causal blocks of queries
          opt_mlp_half | llama_mlp_half                h + ReLU FFN / SwiGLU
      logits: final norm -> LM head
    llama_decode_step, opt_decode_step   decode on the CPU with fused Numba kernels: the layers in one Numba
                                         call where every product is one prepared kernel call
    graph_decode_step                    decode on the GPU (Llama): the step recorded once as a CUDA graph
                                         (runtime/cuda_graph_step.py)

`Model.__init__` is the one place that picks the architecture; the embedding
and the head follow from the tensors the checkpoint holds.

- OPT (Zhang et al. 2022): learned positions with offset 2, pre-LN or post-LN
  layers (`do_layer_norm_before`), `project_in` / `project_out` when
  `word_embed_proj_dim != hidden_size`, ReLU FFN, biases, tied LM head.
- Llama (Touvron et al. 2023; SmolLM2, TinyLlama): RMSNorm, rotary position
  embedding (Su et al. 2021) in the "half-split" layout of HF checkpoints,
  grouped-query attention (Ainslie et al. 2023), SwiGLU (Shazeer 2020).

Every projection goes through `runtime.linear.linear`, so packed weights
slot in without touching this file. Weights are kept under their checkpoint
names: `layers[i]["self_attn.q_proj.weight"]` is
`model.layers.{i}.self_attn.q_proj.weight`.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

from runtime import cuda_graph_step
from runtime.device import to_module
from runtime.checkpoints.config_schema import check_config
from runtime.errors import UserError
from runtime.formats.base import PackedTensor, activation_mode
from runtime.kernels import decode_step_numba as step
from runtime.kernels import decode_layers_numba as decode_layers
from runtime.kernels.prefill_threads import run_split
from runtime.linear import linear, linear_many, one_row_products

PREFILL_BLOCK = 256  # queries per attention block in prefill
# the products of a fused decode step, in order: (projections sharing the input, whether they take biases)
LLAMA_DECODE_PRODUCTS = ((("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), True),
                         (("self_attn.o_proj",), True), (("mlp.gate_proj", "mlp.up_proj"), False),
                         (("mlp.down_proj",), False))
OPT_DECODE_PRODUCTS = ((("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), True),
                       (("self_attn.out_proj",), True), (("fc1",), True), (("fc2",), True))


@dataclass
class Config:
    """The hyper-parameters of one model, read from an HF config.json."""
    arch: str                  # "llama" or "opt"
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    max_positions: int
    norm_eps: float
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    attention_bias: bool = False
    pre_norm: bool = True      # OPT: do_layer_norm_before
    embed_dim: int = 0         # OPT: word_embed_proj_dim (0 = hidden_size)
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "Config":
        """Build from an HF config.json dict, checked against runtime.checkpoints.config_schema (UserError naming
        `source` and the field for a missing, mistyped, out-of-range or unsupported value)."""
        arch, v = check_config(hf, source)
        eos = v["eos_token_id"]
        common = dict(arch=arch, vocab_size=v["vocab_size"], hidden_size=v["hidden_size"],
                      n_layers=v["num_hidden_layers"], n_heads=v["num_attention_heads"],
                      max_positions=v["max_position_embeddings"], tie_embeddings=v["tie_word_embeddings"],
                      bos_token_id=v["bos_token_id"], eos_token_id=eos[0] if isinstance(eos, list) else eos)
        if arch == "opt":
            return cls(**common, n_kv_heads=v["num_attention_heads"], intermediate_size=v["ffn_dim"],
                       norm_eps=1e-5, attention_bias=v["enable_bias"], pre_norm=v["do_layer_norm_before"],
                       embed_dim=v["word_embed_proj_dim"] or v["hidden_size"])
        return cls(**common, n_kv_heads=v["num_key_value_heads"] or v["num_attention_heads"],
                   intermediate_size=v["intermediate_size"], norm_eps=v["rms_norm_eps"],
                   rope_theta=v["rope_theta"], attention_bias=v["attention_bias"], embed_dim=v["hidden_size"])


class KVCache:
    """Preallocated keys and values of every layer, and how many positions are filled."""

    def __init__(self, config: Config, max_len: int, xp=np):
        shape = (config.n_layers, config.n_kv_heads, max_len, config.head_dim)
        self.k = xp.zeros(shape, dtype=xp.float32)  # [L, n_kv, max_len, hd]
        self.v = xp.zeros(shape, dtype=xp.float32)  # [L, n_kv, max_len, hd]
        self.length = 0
        self.max_len = max_len

    def store(self, layer: int, k, v):
        """Write k, v [n_kv, T, hd] at the next T positions; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[1]
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]  # [n_kv, S, hd] each


class Model:
    """An OPT or Llama model: float or packed weights, and its forward passes."""

    def __init__(self, config: Config, tensors: dict, xp=np, fused_decode: bool = True, cuda_graph: bool = True):
        self.config, self.xp = config, xp
        # decode on the CPU: q/k/v and gate/up in one product each; Llama's elementwise work in Numba kernels
        self.fused_decode = fused_decode and xp is np
        # the one place that picks the architecture: checkpoint names, decoder layer, decode step
        llama = config.arch == "llama"
        prefix = "model." if llama else "model.decoder."
        # a decoder layer is two residual halves, attention then MLP (calibration runs each half on its own)
        self.halves = ((self.llama_attention_half, self.llama_mlp_half) if llama
                       else (self.opt_attention_half, self.opt_mlp_half))
        self.decode_step = (self.unfused_decode_step if not self.fused_decode
                            else self.llama_decode_step if llama else self.opt_decode_step)
        self.decode_products = LLAMA_DECODE_PRODUCTS if llama else OPT_DECODE_PRODUCTS
        self._one_row_products = None  # made by `one_row_products` on the first fused decode step
        # packed tensors move themselves; NumPy's own ndarray.to_device (array API) takes no module
        to_device = (lambda a: a) if xp is np else (lambda a: a.to_device(xp) if isinstance(a, PackedTensor)
                                                     else to_module(a, xp))
        self.globals = {k[len(prefix):] if k.startswith(prefix) else k: to_device(v)
                        for k, v in tensors.items() if ".layers." not in k}
        self.layers = [{} for _ in range(config.n_layers)]
        for name, value in tensors.items():
            if ".layers." in name:
                index, _, suffix = name.split(".layers.", 1)[1].partition(".")
                self.layers[int(index)][suffix] = to_device(value)
        self.embed = self.globals["embed_tokens.weight"]  # [vocab, embed_dim]
        self.lm_head = self.globals.get("lm_head.weight", self.embed)  # [vocab, hidden]
        self.inv_freq = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim)
        self.rope_cos = self.rope_sin = None  # [n, hd/2] each, built by rope_table
        self._graph_step = None  # a Llama's decode step on the GPU as a CUDA graph (`graph_decode_step`)
        if xp is not np and cuda_graph and cuda_graph_step.takes(self):
            self.decode_step = self.graph_decode_step

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty KV cache for up to `max_len` positions (default: the model's context)."""
        return KVCache(self.config, max_len or self.config.max_positions, self.xp)

    # ---- prefill: T tokens at once ---------------------------------------------------

    def prefill(self, tokens, cache: KVCache, all_logits: bool = False):
        """Run T tokens at once after what the cache holds; logits [T, vocab] or of the last [vocab]."""
        tokens = np.asarray(tokens, dtype=np.int64)  # [T]
        if cache.length + len(tokens) > cache.max_len:
            raise UserError(f"{cache.length + len(tokens)} tokens do not fit the context of "
                            f"{cache.max_len}: shorten the prompt or --max-new-tokens")
        x = self.forward(tokens, cache)  # [T, d]
        cache.length += len(tokens)
        return self.logits(x) if all_logits else self.logits(x[-1:])[0]  # [T, vocab] or [vocab]

    # ---- decode: one token -----------------------------------------------------------

    def decode(self, token: int, cache: KVCache):
        """Run one token after what the cache holds; logits [vocab]."""
        if cache.length + 1 > cache.max_len:
            raise UserError(f"the context of {cache.max_len} tokens is full: lower --max-new-tokens")
        logits = self.decode_step(token, cache)  # [vocab]
        cache.length += 1
        return logits

    def unfused_decode_step(self, token: int, cache: KVCache):
        """Logits [vocab] of one token at position cache.length through the layer functions of prefill."""
        return self.logits(self.forward(np.array([token]), cache))[0]  # [vocab]

    def graph_decode_step(self, token: int, cache: KVCache):
        """Logits [vocab] of one token at position cache.length on the GPU: the Llama step recorded once per cache
        as a CUDA graph and replayed (runtime/cuda_graph_step.py)."""
        if self._graph_step is None or self._graph_step.cache is not cache:
            self._graph_step = cuda_graph_step.GraphStep(self, cache)
        return self._graph_step.run(token, cache.length)

    def llama_decode_step(self, token: int, cache: KVCache):
        """Logits [vocab] of one token at position cache.length, the layers as fused CPU kernels: one
        product for q/k/v and one for gate/up, each kernel chosen once (`one_row_products`); all layers in
        one Numba call where every product is one prepared kernel call (runtime/kernels/decode_layers_numba.py),
        else `llama_decode_layers`."""
        c, position = self.config, cache.length
        cos, sin = (table[position] for table in self.rope_table(position + 1))  # [hd/2] each
        x = np.asarray(self.embed[token], dtype=np.float32)  # [d]
        layer_products, head = self.one_row_products()
        layer_calls = self._one_row_products["layer_calls"]
        if layer_calls is None:
            x = self.llama_decode_layers(x, cache, cos, sin, layer_products)  # [d]
        else:
            x = decode_layers.run(layer_calls, x, cache.k, cache.v, position, cos, sin, c.head_dim,
                                 c.norm_eps)  # [d]
        return head(step.rms_norm(x, self.globals["norm.weight"], c.norm_eps))[0]  # [vocab]

    def llama_decode_layers(self, x, cache: KVCache, cos, sin, layer_products):
        """The hidden state [d] after every layer for the token x [d] at position cache.length, each layer's
        norms, RoPE, attention with the cache write and SiLU·up one Numba call each
        (runtime/kernels/decode_step_numba.py), its products those of `one_row_products`."""
        c, position = self.config, cache.length
        for i, (w, (qkv, o_proj, gate_up, down)) in enumerate(zip(self.layers, layer_products)):
            n = step.rms_norm(x, w["input_layernorm.weight"], c.norm_eps)  # [d]
            q, k, v = qkv(n)  # [H*hd], [KV*hd] x 2
            step.rope(q, c.head_dim, cos, sin)
            step.rope(k, c.head_dim, cos, sin)
            o = step.attend(q, k, v, cache.k[i], cache.v[i], position)  # [H*hd]
            h = x + o_proj(o)[0]  # [d]
            n = step.rms_norm(h, w["post_attention_layernorm.weight"], c.norm_eps)  # [d]
            gate, up = gate_up(n)  # [ffn] each
            x = h + down(step.silu_mul(gate, up))[0]  # [d]
        return x

    def one_row_products(self):
        """(per layer, a function of one row for each group of `decode_products`; the head): the products of the
        fused decode step with their kernels chosen (runtime.linear.one_row_products), made on the first step
        and again when the activation mode or any weight of the model changes."""
        mode, weights = activation_mode(), [tuple(w.values()) for w in self.layers]  # what they are made from
        made = self._one_row_products
        if made is not None and made["mode"] == mode and made["head"] is self.lm_head and all(
                len(a) == len(b) and all(map(operator.is_, a, b)) for a, b in zip(made["weights"], weights)):
            return made["products"]

        layers = [tuple(one_row_products([w[f"{name}.weight"] for name in names],
                                         [w.get(f"{name}.bias") if bias else None for name in names])
                        for names, bias in self.decode_products) for w in self.layers]
        self._one_row_products = {"mode": mode, "weights": weights, "head": self.lm_head,
                                  "products": (layers, one_row_products([self.lm_head])),
                                  "layer_calls": self.layer_calls()}
        return self._one_row_products["products"]

    def layer_calls(self):
        """The prepared calls of every layer for runtime/kernels/decode_layers_numba.py (with their biases and the
        layers' norm weights), or None where a product is not one prepared kernel call
        (`PackedTensor.prepared_call`: float weights, a mix of formats)."""
        calls, biases = [], []
        for w in self.layers:
            for names, _ in self.decode_products:
                parts = [w[f"{name}.weight"] for name in names]
                packed = all(isinstance(p, PackedTensor) for p in parts)
                calls.append(parts[0].prepared_call(parts) if packed else None)
                found = [w.get(f"{name}.bias") for name in names]
                biases.append(None if all(b is None for b in found) else np.concatenate(
                    [np.zeros(p.shape[0], np.float32) if b is None else b for p, b in zip(parts, found)]))
        names = (("input_layernorm", "post_attention_layernorm") if self.config.arch == "llama"
                 else ("self_attn_layer_norm", "final_layer_norm"))
        norms = [[w[f"{name}.weight"] for name in names] for w in self.layers]  # [layers, 2, d]
        norm_biases = (None if self.config.arch == "llama"  # RMSNorm has none
                       else [[w[f"{name}.bias"] for name in names] for w in self.layers])  # [layers, 2, d]
        return decode_layers.prepare(calls, norms, biases, norm_biases)

    def opt_decode_step(self, token: int, cache: KVCache):
        """Logits [vocab] of one token at position cache.length, OPT's layers as fused CPU kernels: one product
        for q/k/v, each kernel chosen once (`one_row_products`), LayerNorms and attention with the cache write
        each one Numba call; pre-LN or post-LN as the `opt_*_half` pair. All layers in one Numba call where every
        product is one prepared kernel call (runtime/kernels/decode_layers_numba.py), else this loop."""
        c, position = self.config, cache.length
        x = self.embed_tokens(np.array([token]), position)[0]  # [d]
        layer_products, _ = self.one_row_products()
        layer_calls = self._one_row_products["layer_calls"]
        if layer_calls is not None:  # all layers in one Numba call (runtime/kernels/decode_layers_numba.py)
            x = decode_layers.run_opt(layer_calls, np.ascontiguousarray(x, dtype=np.float32), cache.k, cache.v,
                                      position, c.pre_norm, c.norm_eps)  # [d]
            return self.logits(x[None])[0]  # [vocab]
        for i, (w, (qkv, out_proj, fc1, fc2)) in enumerate(zip(self.layers, layer_products)):
            norm = (lambda t, name, w=w: step.layer_norm(t, w[f"{name}.weight"], w[f"{name}.bias"], c.norm_eps))
            a = norm(x, "self_attn_layer_norm") if c.pre_norm else x  # [d]
            q, k, v = qkv(a)  # [H*hd] x 3
            o = step.attend(q, k, v, cache.k[i], cache.v[i], position)  # [H*hd]
            h = x + out_proj(o)[0]  # [d]
            h = h if c.pre_norm else norm(h, "self_attn_layer_norm")  # [d]
            n = norm(h, "final_layer_norm") if c.pre_norm else h  # [d]
            f = fc1(n)[0]  # [ffn]
            out = h + fc2(np.maximum(f, 0, out=f))[0]  # ReLU in place  [d]
            x = out if c.pre_norm else norm(out, "final_layer_norm")  # [d]
        return self.logits(x[None])[0]  # [vocab]

    # ---- the layers, in the order they run -------------------------------------------

    def forward(self, tokens, cache: KVCache):
        """Hidden states [T, d] after the last layer of tokens [T] at positions cache.length.. ;
        writes their keys and values into the cache and leaves cache.length to the caller."""
        x = self.embed_tokens(tokens, cache.length)  # [T, d]
        for i, layer in enumerate(self.layers):
            x = self.block(layer, x, cache, i)  # [T, d]
        return x

    def embed_tokens(self, tokens, start: int):
        """Embeddings [T, d] of tokens at positions start.. : the token embedding, then where the checkpoint
        has them OPT's `project_in` and learned positions."""
        xp, g = self.xp, self.globals
        x = xp.asarray(self.embed[xp.asarray(tokens)], dtype=xp.float32)  # [T, embed_dim]
        if "project_in.weight" in g:
            x = linear(x, g["project_in.weight"])  # [T, d]
        if "embed_positions.weight" in g:
            positions = xp.arange(start, start + len(tokens)) + 2  # OPT's learned positions are offset by 2
            x = x + g["embed_positions.weight"][positions]  # [T, d]
        return x

    def block(self, w: dict, x, cache: KVCache, i: int):
        """Decoder layer i over x [T, d] with its weights w: the attention half, then the MLP half."""
        attention_half, mlp_half = self.halves
        return mlp_half(w, attention_half(w, x, cache, i))  # [T, d]

    def opt_attention_half(self, w: dict, x, cache: KVCache, i: int):
        """h [T, d] = x + attn(LN(x)) of an OPT layer over x [T, d] (pre-LN), or LN(x + attn(x)) (post-LN,
        do_layer_norm_before=False); projections with biases."""
        pre = self.config.pre_norm
        norm = lambda t: self.layer_norm(t, w["self_attn_layer_norm.weight"], w["self_attn_layer_norm.bias"])
        h = x + self.attention(w, norm(x) if pre else x, cache, i, "out_proj", rotary=False)  # [T, d]
        return h if pre else norm(h)  # [T, d]

    def opt_mlp_half(self, w: dict, h):
        """h + fc2(ReLU(fc1(LN(h)))) [T, d] of an OPT layer (pre-LN), or LN(h + fc2(ReLU(fc1(h)))) (post-LN)."""
        pre = self.config.pre_norm
        norm = lambda t: self.layer_norm(t, w["final_layer_norm.weight"], w["final_layer_norm.bias"])
        f = self.xp.maximum(linear(norm(h) if pre else h, w["fc1.weight"], w["fc1.bias"]), 0)  # [T, ffn]
        out = h + linear(f, w["fc2.weight"], w["fc2.bias"])  # [T, d]
        return out if pre else norm(out)  # [T, d]

    def llama_attention_half(self, w: dict, x, cache: KVCache, i: int):
        """h [T, d] = x + attn(rms(x)) of a Llama layer over x [T, d], with RoPE."""
        n = self.rms_norm(x, w["input_layernorm.weight"])  # [T, d]
        return x + self.attention(w, n, cache, i, "o_proj", rotary=True)  # [T, d]

    def llama_mlp_half(self, w: dict, h):
        """h + down(silu(gate(rms(h))) * up(rms(h))) [T, d] of a Llama layer."""
        n = self.rms_norm(h, w["post_attention_layernorm.weight"])  # [T, d]
        gate = linear(n, w["mlp.gate_proj.weight"])  # [T, ffn]
        up = linear(n, w["mlp.up_proj.weight"])  # [T, ffn]
        return h + linear(self.swiglu(gate, up), w["mlp.down_proj.weight"])  # [T, d]

    def swiglu(self, gate, up):
        """silu(gate) * up [T, ffn], silu(g) = g·sigmoid(g) as g (0.5 + 0.5 tanh(g/2)) (no overflow); NumPy rows
        split over the cores (the same operations on each row)."""
        xp = self.xp
        out = xp.empty_like(gate)  # [T, ffn]

        def rows(a, b):
            out[a:b] = gate[a:b] * (0.5 + 0.5 * xp.tanh(0.5 * gate[a:b])) * up[a:b]  # [b - a, ffn]
        if xp is np:
            run_split(gate.shape[0], rows)
        else:
            rows(0, gate.shape[0])
        return out

    def attention(self, w: dict, x, cache: KVCache, i: int, out: str, rotary: bool):
        """Multi-head (grouped-query) self-attention of x [T, d] at positions cache.length.. against the
        cache, for both architectures: rotary embedding when `rotary`, output projection `self_attn.{out}`.
        One token (decode) attends to every cached key; several (prefill) under the causal mask."""
        c, T = self.config, x.shape[0]
        weights = [w[f"self_attn.{p}_proj.weight"] for p in "qkv"]
        biases = [w.get(f"self_attn.{p}_proj.bias") for p in "qkv"]
        q, k, v = (linear_many(x, weights, biases) if self.fused_decode
                   else [linear(x, wp, b) for wp, b in zip(weights, biases)])  # [T, H*hd], [T, KV*hd] x 2
        q = q.reshape(T, c.n_heads, c.head_dim).transpose(1, 0, 2)  # [H, T, hd]
        k = k.reshape(T, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)  # [KV, T, hd]
        v = v.reshape(T, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)  # [KV, T, hd]
        if rotary:
            q, k = self.rope(q, cache.length), self.rope(k, cache.length)  # [H, T, hd], [KV, T, hd]
        keys, values = cache.store(i, k, v)  # [KV, S, hd] each
        if T == 1:
            o = self.attend_decode(q, keys, values)  # [H, 1, hd]
        else:
            o = self.attend_prefill(q, keys, values, cache.length)  # [H, T, hd]
        o = o.transpose(1, 0, 2).reshape(T, c.n_heads * c.head_dim)  # [T, H*hd]
        return linear(o, w[f"self_attn.{out}.weight"], w.get(f"self_attn.{out}.bias"))  # [T, d]

    def attend_decode(self, q, keys, values):
        """Softmax attention of one query [H, 1, hd] over all S cached keys (nothing to mask)."""
        c = self.config
        H, _, hd = q.shape
        q = q.reshape(c.n_kv_heads, H // c.n_kv_heads, hd)  # [KV, G, hd]: heads sharing a kv head
        p = self.softmax(q @ keys.transpose(0, 2, 1) / math.sqrt(hd))  # [KV, G, S]
        return (p @ values).reshape(H, 1, hd)  # [H, 1, hd]

    def attend_prefill(self, q, keys, values, start: int):
        """Causal softmax attention of T queries at positions start.. over S = start+T keys.

        Queries go in blocks of PREFILL_BLOCK, each against the keys it may see, so the work
        and the score buffer shrink with the causal mask. On NumPy the kv heads split over the
        cores (`run_split`: BLAS runs on one thread here).
        """
        xp, c = self.xp, self.config
        H, T, hd = q.shape
        q = q.reshape(c.n_kv_heads, H // c.n_kv_heads, T, hd)  # [KV, G, T, hd]: heads sharing a kv head
        out = xp.empty_like(q)  # [KV, G, T, hd]

        def heads(h0, h1):  # kv heads h0 .. h1-1 and their query heads
            for s in range(0, T, PREFILL_BLOCK):
                e = min(T, s + PREFILL_BLOCK)
                seen = start + e  # keys visible to the block's last query
                scores = (q[h0:h1, :, s:e] @ keys[h0:h1, None, :seen].transpose(0, 1, 3, 2)
                          / math.sqrt(hd))  # [h, G, b, S]
                future = xp.arange(seen)[None, :] > xp.arange(start + s, start + e)[:, None]  # [b, S]
                scores = xp.where(future, -xp.inf, scores)  # [h, G, b, S]
                out[h0:h1, :, s:e] = self.softmax(scores) @ values[h0:h1, None, :seen]  # [h, G, b, hd]
        if xp is np:
            run_split(c.n_kv_heads, heads)  # NumPy's matmuls and ufuncs release the GIL: heads over the cores
        else:
            heads(0, c.n_kv_heads)
        return out.reshape(H, T, hd)  # [H, T, hd]

    def logits(self, x):
        """x [T, d] -> logits [T, vocab]: the final norm (Llama's RMSNorm; pre-LN OPT's LayerNorm), where
        the checkpoint has it OPT's `project_out`, then the LM head."""
        g = self.globals
        if "norm.weight" in g:
            x = self.rms_norm(x, g["norm.weight"])  # [T, d]
        if "final_layer_norm.weight" in g:
            x = self.layer_norm(x, g["final_layer_norm.weight"], g["final_layer_norm.bias"])  # [T, d]
        if "project_out.weight" in g:
            x = linear(x, g["project_out.weight"])  # [T, embed_dim]
        return linear(x, self.lm_head)  # [T, vocab]

    # ---- elementwise pieces ----------------------------------------------------------

    def rope_table(self, end: int):
        """(cos, sin) [>= end, hd/2] float32 of the rotary angles on the model's device: computed once (in
        float64, as HF does) and grown by doubling, so a decode step copies nothing to the GPU."""
        if self.rope_cos is None or self.rope_cos.shape[0] < end:
            n = max(end, 256, 2 * (0 if self.rope_cos is None else self.rope_cos.shape[0]))
            angles = np.arange(n)[:, None] * self.inv_freq[None, :]  # [n, hd/2]
            self.rope_cos = self.xp.asarray(np.cos(angles), dtype=self.xp.float32)  # [n, hd/2]
            self.rope_sin = self.xp.asarray(np.sin(angles), dtype=self.xp.float32)  # [n, hd/2]
        return self.rope_cos, self.rope_sin

    def rope(self, x, start: int):
        """Rotary embedding, HF half-split layout: x [h, T, hd] at positions start.. ."""
        xp = self.xp
        half = x.shape[-1] // 2
        cos, sin = self.rope_table(start + x.shape[1])
        cos, sin = cos[start:start + x.shape[1]], sin[start:start + x.shape[1]]  # [T, hd/2] each
        x1, x2 = x[..., :half], x[..., half:]  # [h, T, hd/2] each
        return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [h, T, hd]

    def rms_norm(self, x, weight):
        """x / sqrt(mean(x²) + eps) * weight, over the last axis."""
        xp = self.xp
        return x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + self.config.norm_eps) * weight

    def layer_norm(self, x, weight, bias):
        """(x - mean) / sqrt(var + eps) * weight + bias, over the last axis."""
        xp = self.xp
        mean = xp.mean(x, axis=-1, keepdims=True)
        var = xp.mean((x - mean) ** 2, axis=-1, keepdims=True)
        return (x - mean) / xp.sqrt(var + self.config.norm_eps) * weight + bias

    def softmax(self, s):
        """Softmax over the last axis, stable for -inf entries."""
        e = self.xp.exp(s - s.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
