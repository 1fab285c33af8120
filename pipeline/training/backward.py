"""The training forward and backward pass of a Llama or OPT model with LoRA adapters on a frozen base.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
§4.1) trains, beside each targeted frozen weight W [out, in], two factors

    y = x Wᵀ + s · (dropout(x) Aᵀ) Bᵀ        A [r, in], B [out, r], s = alpha / r

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
§3) keeps W quantized and back-propagates through its dequantized value: the
input gradient of the frozen product is dx = dy W, with W the dequantized
packed tensor (any format of runtime/formats; `dequantize_cpu`, the format's
Numba decoder where it has one), multiplied by BLAS. Only A
and B receive gradients; the embedding, the norms and the LM head stay frozen.

The forward here mirrors `model.Model.embed_tokens` / `llama_*_half` /
`opt_*_half` / `attention` / `attend_prefill` / `logits` step by step, batched
over [B, T] windows that all start at position 0 (no KV cache), and computes
every projection with the dequantized weight, exactly the function whose
gradient is taken. Each backward function sits right after the forward step it
differentiates. OPT (Zhang et al. 2022, as transformers' `modeling_opt.py`):
LayerNorm, pre-LN or post-LN layers, a ReLU MLP, biases on every projection,
learned positions offset by 2, and `project_in` / `project_out` around the
layers when the embedding is narrower than them; all of those stay frozen.

Activation checkpointing (per half layer): the first forward keeps only the
input of each layer's attention half and of its MLP half (the residual stream
before and after the attention); the backward recomputes one half at a time,
keeping its activations and the layer's dequantized weights, then
differentiates it. So memory is the frozen base plus two residual rows per
layer and token plus about one half layer's work. Keeping the MLP half's input
spares the recomputation the two products whose outputs only feed the residual
stream (the attention's output projection and the MLP's down projection: their
LoRA branch still runs, for its gradients), and the last layer, whose backward
comes right after its forward, keeps its activations from the first forward
and is not recomputed.
Dropout masks are a hash of (seed, layer, projection, entry)
(runtime/kernels/dropout_numba.py), so the recomputation draws the same masks
as the first forward.

The attention's products run by blocks of QUERY_BLOCK query rows, each over
the keys up to the block's last row: the blocks above the diagonal, which the
causal mask zeroes, are never computed (at 512 tokens, 10 of 16 blocks). The
causal softmax of the attention scores, its backward and the LM head's
cross-entropy run as Numba kernels (runtime/kernels/softmax_numba.py), in place
and in fewer passes than NumPy's: they are the largest arrays of a pass. So do
RMSNorm and SwiGLU with their backward (runtime/kernels/norm_swiglu_numba.py).

The loss is the sum of token cross-entropies over the targets that are not
IGNORE; gradients are of that sum, so gradient accumulation divides by the
token count of the whole optimizer step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from model import Model
from runtime.checkpoints.content_hash import run_pending
from runtime.errors import UserError
from runtime.formats.base import PackedTensor
from runtime.kernels import dropout_numba
from runtime.kernels.norm_swiglu_numba import rms_norm, rms_norm_backward, swiglu, swiglu_backward
from runtime.kernels.softmax_numba import causal_softmax_, causal_softmax_backward_, cross_entropy_

IGNORE = -100  # a target that adds nothing to the loss (HF's label convention)
HEAD_ROWS = 1024  # LM-head rows per chunk: the logits of one chunk are [HEAD_ROWS, vocab]
QUERY_BLOCK = 128  # attention query rows per product (measured at 512 tokens: 128 beat 64 and 256)
PROJECTIONS = {"llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
               "opt": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "fc1", "fc2")}  # arch -> the projections of one layer, as named in its checkpoint


@dataclass
class Adapter:
    """The trained LoRA factors, keyed by the checkpoint name of the weight they update."""
    A: dict  # name -> [r, in] float32
    B: dict  # name -> [out, r] float32
    rank: int
    alpha: float
    targets: list  # module names as given (q_proj, ...), for adapter_config.json

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def names(self) -> list:
        return sorted(self.A)


def layer_prefix(model: Model, i: int) -> str:
    """Checkpoint-name prefix of layer i's weights."""
    return f"model.decoder.layers.{i}." if model.config.arch == "opt" else f"model.layers.{i}."


def dense(weight) -> np.ndarray:
    """The float32 matrix of a frozen weight: a packed one is dequantized (its checksum checked first)."""
    run_pending(weight)
    if isinstance(weight, PackedTensor):
        return weight.dequantize_cpu()  # [out, in]
    return np.asarray(weight, dtype=np.float32)  # [out, in]


def dense_layer(layer: dict) -> dict:
    """Every weight of one layer as float32 arrays (projections dequantized)."""
    return {name: dense(w) for name, w in layer.items()}


class Pass:
    """One micro-batch's forward and backward through a model with an adapter."""

    def __init__(self, model: Model, adapter: Adapter, dropout: float = 0.0, seed: int = 0,
                 head: np.ndarray | None = None):
        """head: the model's LM head as float32 [vocab, e] when the caller keeps it between passes (frozen;
        None: dequantized by this pass)."""
        self.model, self.adapter, self.dropout, self.seed = model, adapter, dropout, seed
        self.head_weight = head
        llama = model.config.arch == "llama"
        self.halves = ((self.llama_attention_half, self.llama_attention_half_backward),
                       (self.llama_mlp_half, self.llama_mlp_half_backward)) if llama else (
            (self.opt_attention_half, self.opt_attention_half_backward),
            (self.opt_mlp_half, self.opt_mlp_half_backward))  # a layer's halves in order, each with its backward
        self.grads_A = {name: np.zeros_like(a) for name, a in adapter.A.items()}  # name -> [r, in]
        self.grads_B = {name: np.zeros_like(b) for name, b in adapter.B.items()}  # name -> [out, r]

    # ---- the whole pass --------------------------------------------------------------

    def run(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
        """Forward and backward of inputs [B, T] against targets [B, T] (IGNORE = no loss).

        Adds the gradients of the summed loss to grads_A / grads_B; returns (summed loss, token count)."""
        m = self.model
        inputs = np.asarray(inputs, dtype=np.int64)  # [B, T]
        if inputs.shape[1] > m.config.max_positions:
            raise UserError(f"windows of {inputs.shape[1]} tokens exceed the model's context of "
                            f"{m.config.max_positions}: lower --seqlen")
        x = self.embed(inputs)  # [B, T, d]
        last = m.config.n_layers - 1
        half_inputs = []  # per layer: the input of each half  [B, T, d] each
        for i in range(m.config.n_layers):
            weights = dense_layer(m.layers[i])
            saved = [{} for _ in self.halves]  # kept only for the last layer, whose backward comes next
            half_inputs.append([])
            for (forward, _), keep in zip(self.halves, saved):
                half_inputs[i].append(x)
                x = forward(i, weights, x, keep)  # [B, T, d]
        loss, count, dx = self.head(x, targets)  # dx [B, T, d]
        for i in reversed(range(m.config.n_layers)):
            if i < last:
                weights, saved = dense_layer(m.layers[i]), [{} for _ in self.halves]
            for (forward, backward), keep, x in reversed(list(zip(self.halves, saved, half_inputs.pop()))):
                if i < last:
                    forward(i, weights, x, keep, output=False)  # recompute, keeping activations
                dx = backward(i, weights, dx, keep)  # [B, T, d]
        return loss, count

    # ---- embeddings (frozen: nothing below the first layer needs a gradient) ---------

    def embed(self, inputs: np.ndarray) -> np.ndarray:
        """model.Model.embed_tokens of windows inputs [B, T] at positions 0..T-1: [B, T, d]."""
        m, g = self.model, self.model.globals
        x = np.asarray(m.embed[inputs], dtype=np.float32)  # [B, T, embed_dim]
        if m.config.arch == "llama":
            return x
        if "project_in.weight" in g:
            x = x @ dense(g["project_in.weight"]).T  # [B, T, d]
        T = inputs.shape[1]
        return x + np.asarray(g["embed_positions.weight"][2:T + 2], dtype=np.float32)  # offset by 2  [B, T, d]

    # ---- final norm, LM head and cross-entropy ---------------------------------------

    def head(self, x: np.ndarray, targets: np.ndarray) -> tuple[float, int, np.ndarray]:
        """Summed cross-entropy of final(x) @ lm_headᵀ against targets, its count, and dL/dx [B, T, d].

        Only rows with a target are projected, in chunks of HEAD_ROWS, so the logits never exceed
        [HEAD_ROWS, vocab]."""
        B, T, _ = x.shape
        head = dense(self.model.lm_head) if self.head_weight is None else self.head_weight  # [vocab, e]
        kept = {}
        n = self.final(x, kept)  # [B, T, e]
        rows = n.reshape(B * T, -1)  # [BT, e]
        flat = np.asarray(targets, dtype=np.int64).reshape(B * T)  # [BT]
        if flat.max(initial=-1) >= head.shape[0]:
            raise UserError(f"a target token id {flat.max()} is outside the vocabulary of {head.shape[0]}")
        chosen = np.flatnonzero(flat != IGNORE)  # [N]
        dn = np.zeros_like(rows)  # [BT, e]
        loss = 0.0
        for s in range(0, len(chosen), HEAD_ROWS):
            idx = chosen[s:s + HEAD_ROWS]  # [c]
            logits = rows[idx] @ head.T  # [c, vocab]
            loss += float(cross_entropy_(logits, flat[idx]).sum())  # logits become dL/dlogits  [c, vocab]
            dn[idx] = logits @ head  # [c, e]
        return loss, len(chosen), self.final_backward(dn.reshape(B, T, -1), kept)

    def final(self, x: np.ndarray, keep: dict) -> np.ndarray:
        """model.Model.logits up to the LM head: the final norm of x [B, T, d] (OPT: if any, then project_out),
        [B, T, e]; `keep` receives the norm's input and scale."""
        c, g = self.model.config, self.model.globals
        if c.arch == "llama":
            n, r = rms_norm(x, dense(g["norm.weight"]), c.norm_eps)  # [B, T, d], [B, T, 1]
            keep.update(x=x, r=r)
            return n
        if "final_layer_norm.weight" in g:
            n, r = layer_norm(x, dense(g["final_layer_norm.weight"]), dense(g["final_layer_norm.bias"]),
                              c.norm_eps)  # [B, T, d], [B, T, 1]
            keep.update(x=x, r=r)
            x = n
        if "project_out.weight" in g:
            x = x @ dense(g["project_out.weight"]).T  # [B, T, e]
        return x

    def final_backward(self, dy: np.ndarray, s: dict) -> np.ndarray:
        """dL/dx [B, T, d] of final's input from dL/dy [B, T, e]."""
        c, g = self.model.config, self.model.globals
        if c.arch == "llama":
            return rms_norm_backward(s["x"], dense(g["norm.weight"]), s["r"], dy)  # [B, T, d]
        if "project_out.weight" in g:
            dy = dy @ dense(g["project_out.weight"])  # [B, T, d]
        if "final_layer_norm.weight" in g:
            dy = layer_norm_backward(s["x"], dense(g["final_layer_norm.weight"]), s["r"], dy)  # [B, T, d]
        return dy

    # ---- one layer -------------------------------------------------------------------

    def llama_attention_half(self, i: int, w: dict, x: np.ndarray, keep: dict, output: bool = True):
        """model.Model.llama_attention_half over x [B, T, d]: x + attention(rms_norm(x)) [B, T, d]; `keep`
        receives what the backward needs. output=False (a recomputation): None, without the output
        projection's product."""
        n1, r1 = rms_norm(x, w["input_layernorm.weight"], self.model.config.norm_eps)  # [B, T, d], [B, T, 1]
        a = self.attention(i, w, n1, keep, output)  # [B, T, d] or None
        keep.update(x=x, r1=r1)
        return None if a is None else x + a

    def llama_attention_half_backward(self, i: int, w: dict, dh: np.ndarray, s: dict) -> np.ndarray:
        """dL/dx [B, T, d] of the half's input from dL/dh [B, T, d]; LoRA gradients added on the way."""
        dn1 = self.attention_backward(i, w, dh, s)  # [B, T, d]
        return dh + rms_norm_backward(s["x"], w["input_layernorm.weight"], s["r1"], dn1)  # [B, T, d]

    def llama_mlp_half(self, i: int, w: dict, h: np.ndarray, keep: dict, output: bool = True):
        """model.Model.llama_mlp_half over h [B, T, d]: h + down(silu(gate(n)) · up(n)), n = rms_norm(h)
        [B, T, d]; `keep` receives what the backward needs. output=False: None, without down's product."""
        n2, r2 = rms_norm(h, w["post_attention_layernorm.weight"], self.model.config.norm_eps)  # [B, T, d]
        gate = self.project(i, w, "mlp.gate_proj", n2, keep)  # [B, T, ffn]
        up = self.project(i, w, "mlp.up_proj", n2, keep)  # [B, T, ffn]
        sig, act = swiglu(gate, up)  # σ(gate), silu(gate) · up  [B, T, ffn] each
        y = self.project(i, w, "mlp.down_proj", act, keep, output)  # [B, T, d] or None
        keep.update(h=h, r2=r2, gate=gate, up=up, sig=sig)
        return None if y is None else h + y

    def llama_mlp_half_backward(self, i: int, w: dict, dout: np.ndarray, s: dict) -> np.ndarray:
        """dL/dh [B, T, d] of the half's input from dL/dout [B, T, d]; LoRA gradients added on the way."""
        gate, up, sig = s["gate"], s["up"], s["sig"]  # [B, T, ffn] each
        dact = self.project_backward(i, w, "mlp.down_proj", dout, s)  # [B, T, ffn]
        dgate, dup = swiglu_backward(dact, gate, up, sig)  # d silu(g) / dg = σ(g)(1 + g(1 - σ(g)))  [B, T, ffn]
        dn2 = (self.project_backward(i, w, "mlp.gate_proj", dgate, s)
               + self.project_backward(i, w, "mlp.up_proj", dup, s))  # [B, T, d]
        return dout + rms_norm_backward(s["h"], w["post_attention_layernorm.weight"], s["r2"], dn2)  # [B, T, d]

    def opt_attention_half(self, i: int, w: dict, x: np.ndarray, keep: dict, output: bool = True):
        """model.Model.opt_attention_half over x [B, T, d], pre-LN or post-LN [B, T, d]; `keep` receives what
        the backward needs. output=False: None, without the output projection's product where nothing
        after it needs it (pre-LN; post-LN's norm needs the sum)."""
        pre = self.model.config.pre_norm
        a = self.attention(i, w, self.norm(w, "self_attn_layer_norm", x, keep) if pre else x, keep,
                           output or not pre)  # [B, T, d] or None
        if a is None:
            return None
        return x + a if pre else self.norm(w, "self_attn_layer_norm", x + a, keep)  # [B, T, d]

    def opt_attention_half_backward(self, i: int, w: dict, dh: np.ndarray, s: dict) -> np.ndarray:
        """dL/dx [B, T, d] of the half's input from dL/dh [B, T, d]; LoRA gradients added on the way."""
        return self.opt_residual_backward(w, "self_attn_layer_norm", dh, s,
                                          lambda dn: self.attention_backward(i, w, dn, s))  # [B, T, d]

    def opt_mlp_half(self, i: int, w: dict, h: np.ndarray, keep: dict, output: bool = True):
        """model.Model.opt_mlp_half over h [B, T, d]: the ReLU MLP, pre-LN or post-LN [B, T, d]; `keep`
        receives what the backward needs. output=False: None, without fc2's product where nothing after it
        needs it (pre-LN)."""
        pre = self.model.config.pre_norm
        n = self.norm(w, "final_layer_norm", h, keep) if pre else h  # [B, T, d]
        f = np.maximum(self.project(i, w, "fc1", n, keep), 0)  # ReLU  [B, T, ffn]
        y = self.project(i, w, "fc2", f, keep, output or not pre)  # [B, T, d] or None
        keep.update(f=f)
        if y is None:
            return None
        return h + y if pre else self.norm(w, "final_layer_norm", h + y, keep)  # [B, T, d]

    def opt_mlp_half_backward(self, i: int, w: dict, dout: np.ndarray, s: dict) -> np.ndarray:
        """dL/dh [B, T, d] of the half's input from dL/dout [B, T, d]; LoRA gradients added on the way."""
        def mlp_backward(dy):  # dL/d(the MLP's input) [B, T, d] from dL/d(its output) [B, T, d]
            df = self.project_backward(i, w, "fc2", dy, s) * (s["f"] > 0)  # ReLU': 1 where it passed  [B, T, ffn]
            return self.project_backward(i, w, "fc1", df, s)  # [B, T, d]
        return self.opt_residual_backward(w, "final_layer_norm", dout, s, mlp_backward)  # [B, T, d]

    def opt_residual_backward(self, w: dict, norm: str, dy: np.ndarray, s: dict, branch) -> np.ndarray:
        """dL/dx [B, T, d] of an OPT half, x + branch(norm(x)) (pre-LN) or norm(x + branch(x)) (post-LN),
        from dL/dy [B, T, d]; `branch` maps the gradient of its output to that of its input."""
        if self.model.config.pre_norm:
            return dy + self.norm_backward(w, norm, branch(dy), s)  # [B, T, d]
        dsum = self.norm_backward(w, norm, dy, s)  # [B, T, d] of x + branch(x)
        return dsum + branch(dsum)  # [B, T, d]

    def norm(self, w: dict, name: str, x: np.ndarray, keep: dict) -> np.ndarray:
        """The LayerNorm `name` of a layer over x [B, T, d]; keep[name] receives its input and scale."""
        y, r = layer_norm(x, w[f"{name}.weight"], w[f"{name}.bias"], self.model.config.norm_eps)  # [B, T, d]
        keep[name] = (x, r)
        return y

    def norm_backward(self, w: dict, name: str, dy: np.ndarray, s: dict) -> np.ndarray:
        """dL/dx [B, T, d] of the LayerNorm `name` from dL/dy [B, T, d]."""
        x, r = s[name]  # [B, T, d], [B, T, 1]
        return layer_norm_backward(x, w[f"{name}.weight"], r, dy)  # [B, T, d]

    # ---- attention -------------------------------------------------------------------

    def attention(self, i: int, w: dict, x: np.ndarray, keep: dict, output: bool = True):
        """Causal grouped-query self-attention of x [B, T, d] (model.Model.attention + attend_prefill); Llama
        rotates q and k (RoPE), OPT's positions were added to the embedding. output=False: None, without the
        output projection's product (`project`)."""
        c = self.model.config
        B, T, _ = x.shape
        H, KV, hd = c.n_heads, c.n_kv_heads, c.head_dim
        q = self.project(i, w, "self_attn.q_proj", x, keep).reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # [B, H, T, hd]
        k = self.project(i, w, "self_attn.k_proj", x, keep).reshape(B, T, KV, hd).transpose(0, 2, 1, 3)  # [B, KV, T, hd]
        v = self.project(i, w, "self_attn.v_proj", x, keep).reshape(B, T, KV, hd).transpose(0, 2, 1, 3)  # [B, KV, T, hd]
        if c.arch == "llama":
            cos, sin = (t[:T] for t in self.model.rope_table(T))  # [T, hd/2] each
            q, k = rope(q, cos, sin), rope(k, cos, sin)  # [B, H, T, hd], [B, KV, T, hd]
            keep.update(cos=cos, sin=sin)
        q = q.reshape(B, KV, H // KV, T, hd)  # [B, KV, G, T, hd]: heads sharing a kv head
        k = k[:, :, None]  # [B, KV, 1, T, hd]
        v = v[:, :, None]  # [B, KV, 1, T, hd]
        scores = np.empty((B, KV, H // KV, T, T), dtype=np.float32)  # [B, KV, G, T, T]
        for a, b in query_blocks(T):
            np.matmul(q[..., a:b, :], k[..., :b, :].transpose(0, 1, 2, 4, 3), out=scores[..., a:b, :b])
        p = causal_softmax_(scores, 1 / math.sqrt(hd))  # [B, KV, G, T, T], 0 for the future keys
        o = np.empty_like(q)  # [B, KV, G, T, hd]
        for a, b in query_blocks(T):
            np.matmul(p[..., a:b, :b], v[..., :b, :], out=o[..., a:b, :])
        o = o.reshape(B, H, T, hd).transpose(0, 2, 1, 3).reshape(B, T, H * hd)  # [B, T, H*hd]
        keep.update(q=q, k=k, v=v, p=p)
        return self.project(i, w, self.out_proj(), o, keep, output)  # [B, T, d] or None

    def out_proj(self) -> str:
        """The attention's output projection (model.Model.attention's out_name)."""
        return "self_attn.out_proj" if self.model.config.arch == "opt" else "self_attn.o_proj"

    def attention_backward(self, i: int, w: dict, dy: np.ndarray, s: dict) -> np.ndarray:
        """dL/dx [B, T, d] of the attention's input from dL/dy [B, T, d]."""
        c = self.model.config
        B, T, _ = dy.shape
        H, KV, hd = c.n_heads, c.n_kv_heads, c.head_dim
        q, k, v, p = s["q"], s["k"], s["v"], s["p"]  # [B, KV, G, T, hd], [B, KV, 1, T, hd] x 2, [B, KV, G, T, T]
        do = self.project_backward(i, w, self.out_proj(), dy, s)  # [B, T, H*hd]
        do = do.reshape(B, T, H, hd).transpose(0, 2, 1, 3).reshape(B, KV, H // KV, T, hd)  # [B, KV, G, T, hd]
        dp = np.empty_like(p)  # [B, KV, G, T, T]
        for a, b in query_blocks(T):
            np.matmul(do[..., a:b, :], v[..., :b, :].transpose(0, 1, 2, 4, 3), out=dp[..., a:b, :b])
        dscores = causal_softmax_backward_(p, dp, 1 / math.sqrt(hd))  # softmax', over dp  [B, KV, G, T, T]
        dq, dk, dv = np.empty_like(q), np.empty_like(k[:, :, 0]), np.empty_like(v[:, :, 0])  # [B, KV, (G,) T, hd]
        for a, b in query_blocks(T):
            np.matmul(dscores[..., a:b, :b], k[..., :b, :], out=dq[..., a:b, :])
            # keys a..b-1 are seen by the queries a..T-1
            dk[..., a:b, :] = (dscores[..., a:, a:b].transpose(0, 1, 2, 4, 3) @ q[..., a:, :]).sum(axis=2)
            dv[..., a:b, :] = (p[..., a:, a:b].transpose(0, 1, 2, 4, 3) @ do[..., a:, :]).sum(axis=2)
        dq = dq.reshape(B, H, T, hd)  # [B, H, T, hd]
        if c.arch == "llama":
            dq, dk = rope_backward(dq, s["cos"], s["sin"]), rope_backward(dk, s["cos"], s["sin"])  # as q, k
        rows = lambda t: t.transpose(0, 2, 1, 3).reshape(B, T, -1)  # [B, h, T, hd] -> [B, T, h*hd]
        return (self.project_backward(i, w, "self_attn.q_proj", rows(dq), s)
                + self.project_backward(i, w, "self_attn.k_proj", rows(dk), s)
                + self.project_backward(i, w, "self_attn.v_proj", rows(dv), s))  # [B, T, d]

    # ---- a frozen projection with its LoRA branch ------------------------------------

    def project(self, i: int, w: dict, module: str, x: np.ndarray, keep: dict, output: bool = True):
        """y = x Wᵀ (+ b) + s · (dropout(x) Aᵀ) Bᵀ for the weight `module` of layer i; x [B, T, in].
        keep[module] receives the LoRA branch's input and down-projection (its backward's), if it has one.
        output=False: None, with only that kept (a recomputation whose y nothing reads)."""
        name = f"{layer_prefix(self.model, i)}{module}.weight"
        if name in self.adapter.A:
            mask = self.dropout_mask(i, module, x.shape)  # [B, T, in] or None
            xd = x if mask is None else x * mask  # [B, T, in]
            keep[module] = (mask, xd, xd @ self.adapter.A[name].T)  # ..., down [B, T, r]
        if not output:
            return None
        W, bias = w[f"{module}.weight"], w.get(f"{module}.bias")  # [out, in], [out] or None
        y = x @ W.T  # [B, T, out]
        if bias is not None:
            y += bias
        if name in self.adapter.A:
            y += (np.float32(self.adapter.scale) * keep[module][2]) @ self.adapter.B[name].T  # scaled while [B, T, r]
        return y  # [B, T, out]

    def project_backward(self, i: int, w: dict, module: str, dy: np.ndarray, s: dict) -> np.ndarray:
        """dL/dx [B, T, in] from dL/dy [B, T, out]: dy W through the frozen weight (dequantized), plus the
        LoRA branch, whose gradients dA = s (dy B)ᵀ xd and dB = s dyᵀ (xd Aᵀ) are added to grads_A / grads_B."""
        dx = dy @ w[f"{module}.weight"]  # [B, T, in]
        name = f"{layer_prefix(self.model, i)}{module}.weight"
        if name not in self.adapter.A:
            return dx
        mask, xd, down = s[module]  # [B, T, in] or None, [B, T, in], [B, T, r]
        scale = np.float32(self.adapter.scale)
        r, n_in, n_out = down.shape[-1], xd.shape[-1], dy.shape[-1]
        g = scale * (dy @ self.adapter.B[name])  # dL/d(down)  [B, T, r]
        self.grads_B[name] += scale * (dy.reshape(-1, n_out).T @ down.reshape(-1, r))  # [out, r]
        self.grads_A[name] += g.reshape(-1, r).T @ xd.reshape(-1, n_in)  # [r, in]
        dxd = g @ self.adapter.A[name]  # [B, T, in]
        if mask is not None:
            dxd *= mask
        dx += dxd
        return dx  # [B, T, in]

    def dropout_mask(self, i: int, module: str, shape: tuple):
        """Inverted-dropout mask (0 or 1/(1-p)) [shape] of the stream (seed, layer, projection), or None."""
        if self.dropout == 0:
            return None
        key = dropout_numba.stream_key(self.seed, i, PROJECTIONS[self.model.config.arch].index(module))
        return dropout_numba.dropout_mask(shape, key, self.dropout)  # [shape]


def query_blocks(T: int):
    """(first, end) of each block of QUERY_BLOCK query rows of a causal attention over T positions: the
    block's queries see the keys 0..end-1."""
    return [(a, min(a + QUERY_BLOCK, T)) for a in range(0, T, QUERY_BLOCK)]


# ---- elementwise pieces, each with its backward ------------------------------------------

def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """((x - mean) · r · weight + bias, r) with r = 1 / sqrt(var(x) + eps) [..., 1] (model.Model.layer_norm)."""
    xc = x - np.mean(x, axis=-1, keepdims=True)  # [..., d]
    r = 1 / np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + np.float32(eps))  # [..., 1]
    return xc * r * weight + bias, r


def layer_norm_backward(x: np.ndarray, weight: np.ndarray, r: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dL/dx [..., d] of layer_norm: r·(u - mean(u) - x̂·mean(u·x̂)), u = weight·dy, x̂ = (x - mean)·r."""
    u = dy * weight  # [..., d]
    xhat = (x - np.mean(x, axis=-1, keepdims=True)) * r  # [..., d]
    return r * (u - np.mean(u, axis=-1, keepdims=True) - xhat * np.mean(u * xhat, axis=-1, keepdims=True))


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Half-split rotary embedding of x [..., T, hd] (model.Model.rope): cos, sin [T, hd/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [..., T, hd/2] each
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [..., T, hd]


def rope_backward(dy: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """dL/dx of rope: the rotation transposed, i.e. rope by the opposite angle."""
    return rope(dy, cos, -sin)  # [..., T, hd]
