"""The QLoRA training loop: micro-batches, gradient accumulation, clipping, AdamW, schedule, checkpoints.

QLoRA (Dettmers et al. 2023, §3-4): LoRA adapters (Hu et al. 2021) on every
projection of a frozen, quantized base, trained with AdamW (Loshchilov &
Hutter 2019) under a warm-up + decay schedule and global-norm clipping. One
optimizer step sums the gradients of `grad_accum` micro-batches and divides
by their number of target tokens, so the step's loss is the mean over every
token it saw however the batch is split.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from model import Model
from runtime.errors import UserError
from pipeline.training.adapter import module_names, new_adapter, write_adapter
from pipeline.training.backward import Adapter, Pass, dense
from pipeline.training.checkpoint import load_checkpoint, save_checkpoint
from pipeline.training.data import Dataset
from pipeline.training.optimizer import AdamW, AdamWSettings, clip_grad_norm, lr_factor


@dataclass
class TrainSettings:
    """Everything that decides what a run computes (a resumed run must repeat it)."""
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple = ()  # module names (q_proj, ...); empty: every projection of the model
    seqlen: int = 512
    batch: int = 4
    grad_accum: int = 4
    steps: int = 0  # 0: from epochs
    epochs: float = 1.0
    lr: float = 2e-4
    warmup: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    init: str = "lora"  # the adapter's start: LoRA's, or compensating the base's quantization error (compensation.py)

    def total_steps(self, dataset: Dataset) -> int:
        """--steps, or the optimizer steps that cover --epochs passes over the data."""
        return self.steps or max(1, math.ceil(self.epochs * dataset.per_epoch / self.grad_accum))


def micro_seed(seed: int, j: int) -> int:
    """The dropout seed of micro-batch j, a pure function of (seed, j)."""
    return int(np.random.SeedSequence([seed, j]).generate_state(1)[0])


def parameters(adapter: Adapter) -> dict:
    """The trained arrays under "A.<name>" / "B.<name>" (the adapter's own arrays, updated in place)."""
    params = {f"A.{name}": a for name, a in adapter.A.items()}
    params.update({f"B.{name}": b for name, b in adapter.B.items()})
    return params


def train(model: Model, dataset: Dataset, settings: TrainSettings, out: Path, base_name: str,
          save_every: int = 0, resume: bool = False, progress: bool = True,
          initialize: Callable[[Adapter], None] | None = None) -> Adapter:
    """Train an adapter on `dataset`, checkpoint every `save_every` steps, write it to `out` (PEFT layout).
    `initialize` sets a fresh adapter's factors before the first step (compensation.compensate for
    settings.init); a resumed run takes them from its checkpoint instead."""
    adapter = new_adapter(model, list(settings.targets) or module_names(model), settings.rank, settings.alpha,
                          np.random.default_rng(settings.seed))
    params = parameters(adapter)
    optimizer = AdamW(params, AdamWSettings(lr=settings.lr, weight_decay=settings.weight_decay))
    total = settings.total_steps(dataset)
    recorded = dict(dataclasses.asdict(settings), targets=list(settings.targets), total_steps=total)
    start = 0
    if resume:
        state, arrays = load_checkpoint(out, recorded)
        for name, p in params.items():
            p[...] = arrays[name]
        optimizer.load_state(arrays)
        start = state["step"]
    elif initialize is not None:
        initialize(adapter)
    head = dense(model.lm_head)  # [vocab, e] frozen: dequantized once for every pass
    bar = tqdm(total=total, initial=start, desc="training", unit="step", disable=not progress, dynamic_ncols=True)
    for step in range(start, total):
        began = time.perf_counter()
        grads = {name: np.zeros_like(p) for name, p in params.items()}
        loss, count, tokens = 0.0, 0, 0
        for a in range(settings.grad_accum):
            j = step * settings.grad_accum + a
            inputs, targets = dataset.micro_batch(j)  # [B, T] each
            micro = Pass(model, adapter, settings.dropout, micro_seed(settings.seed, j), head)
            part_loss, part_count = micro.run(inputs, targets)
            for name in adapter.names():
                grads[f"A.{name}"] += micro.grads_A[name]
                grads[f"B.{name}"] += micro.grads_B[name]
            loss, count, tokens = loss + part_loss, count + part_count, tokens + inputs.size
        if not math.isfinite(loss):
            raise UserError(f"the loss became {loss} at step {step + 1}: training diverged; lower --lr or "
                            f"--max-grad-norm, or resume from the last checkpoint with other settings")
        for g in grads.values():
            g /= np.float32(max(count, 1))
        clip_grad_norm(grads, settings.max_grad_norm)
        lr = settings.lr * lr_factor(step, total, settings.warmup, settings.schedule)
        optimizer.update(grads, lr)
        bar.set_postfix(loss=f"{loss / max(count, 1):.4f}", lr=f"{lr:.2e}",
                        tok_s=f"{tokens / (time.perf_counter() - began):.0f}")
        bar.update(1)
        done = step + 1
        if save_every and done % save_every == 0 and done < total:
            save_checkpoint(out, done, done * settings.grad_accum, recorded, {**params, **optimizer.state()})
    bar.close()
    write_adapter(out, adapter, base_name, settings.dropout)
    save_checkpoint(out, total, total * settings.grad_accum, recorded, {**params, **optimizer.state()})
    return adapter
