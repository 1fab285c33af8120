"""AdamW with decoupled weight decay, global-norm gradient clipping and the learning-rate schedules.

AdamW: Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization",
Algorithm 2: the decay multiplies the weights by (1 - lr·λ) apart from the
Adam update (Kingma & Ba 2015), whose moments are bias-corrected. Clipping
rescales all gradients together when their global L2 norm exceeds the limit
(Pascanu et al. 2013). The schedule is a linear warm-up, then cosine or
linear decay to zero, as QLoRA's (Dettmers et al. 2023) training recipes use;
step k (counted from 0) runs at lr · factor(k).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class AdamWSettings:
    lr: float = 2e-4
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0


class AdamW:
    """AdamW over a dict of float32 parameters (updated in place); its state is `step`, `m` and `v`."""

    def __init__(self, params: dict, settings: AdamWSettings):
        self.params, self.settings = params, settings
        self.step = 0
        self.m = {name: np.zeros_like(p) for name, p in params.items()}  # first moments, like each parameter
        self.v = {name: np.zeros_like(p) for name, p in params.items()}  # second moments

    def update(self, grads: dict, lr: float) -> None:
        """One step with learning rate `lr` and the gradients `grads` (same keys and shapes as params)."""
        s = self.settings
        b1, b2 = s.betas
        self.step += 1
        correction1, correction2 = 1 - b1 ** self.step, 1 - b2 ** self.step
        for name, p in self.params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            p *= np.float32(1 - lr * s.weight_decay)  # decoupled weight decay
            m *= np.float32(b1)
            m += np.float32(1 - b1) * g  # m ← β1 m + (1 - β1) g
            v *= np.float32(b2)
            v += np.float32(1 - b2) * g * g  # v ← β2 v + (1 - β2) g²
            denom = np.sqrt(v) / np.float32(math.sqrt(correction2)) + np.float32(s.eps)
            p -= np.float32(lr / correction1) * m / denom  # p ← p - lr · m̂ / (sqrt(v̂) + ε)

    def state(self) -> dict:
        """Arrays to checkpoint: the moments under "m.NAME" / "v.NAME", and the step count."""
        arrays = {f"m.{name}": a for name, a in self.m.items()}
        arrays.update({f"v.{name}": a for name, a in self.v.items()})
        arrays["step"] = np.array([self.step], dtype=np.int64)
        return arrays

    def load_state(self, arrays: dict) -> None:
        """Restore what `state` returned (the parameters are restored separately)."""
        for name in self.params:
            self.m[name][...] = arrays[f"m.{name}"]
            self.v[name][...] = arrays[f"v.{name}"]
        self.step = int(arrays["step"][0])


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale every gradient by max_norm / (norm + 1e-6) when the global L2 norm exceeds max_norm; return
    the norm before clipping. max_norm <= 0 only measures."""
    norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    if max_norm > 0 and norm > max_norm:
        factor = np.float32(max_norm / (norm + 1e-6))
        for g in grads.values():
            g *= factor
    return norm


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The multiplier of the base learning rate at optimizer step `step` (0-based) of `total`."""
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
