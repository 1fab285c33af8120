"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Applied in the order of HF transformers' `generate`: repetition penalty
(Keskar et al. 2019, CTRL: a seen token's logit is divided by the penalty when
positive, multiplied when negative), temperature, top-k, top-p (nucleus
sampling, Holtzman et al. 2020: the smallest set of most likely tokens whose
probability reaches p). Temperature 0 means greedy (argmax).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import UserError


@dataclass
class SamplingParams:
    """The options of one generation, as the CLI and the Python API take them."""
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128

    def check(self) -> "SamplingParams":
        """Raise UserError for any option out of its range; return self."""
        rules = [(self.temperature >= 0, "--temperature must be >= 0 (0 means greedy)"),
                 (self.top_k >= 0, "--top-k must be >= 0 (0 disables it)"),
                 (0 < self.top_p <= 1, "--top-p must be in (0, 1] (1 disables it)"),
                 (self.repetition_penalty > 0, "--repetition-penalty must be > 0 (1 disables it)"),
                 (self.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
                 (self.seed is None or self.seed >= 0, "--seed must be >= 0")]
        for ok, message in rules:
            if not ok:
                raise UserError(message)
        return self


def penalize_repetition(logits: np.ndarray, seen, penalty: float) -> np.ndarray:
    """CTRL's repetition penalty on the logits [vocab] of every token id in `seen`."""
    if penalty == 1.0 or not len(seen):
        return logits
    logits = logits.copy()
    ids = np.unique(np.asarray(seen))
    chosen = logits[ids]
    logits[ids] = np.where(chosen > 0, chosen / penalty, chosen * penalty)
    return logits


def distribution(logits: np.ndarray, params: SamplingParams, seen=()) -> tuple[np.ndarray, np.ndarray]:
    """The token ids that may be drawn and their probabilities, from logits [vocab]; temperature > 0."""
    logits = penalize_repetition(logits.astype(np.float64), seen, params.repetition_penalty) / params.temperature
    order = np.argsort(-logits, kind="stable")  # token ids, most likely first
    if params.top_k:
        order = order[:params.top_k]
    probs = np.exp(logits[order] - logits[order[0]])
    probs /= probs.sum()  # [k]
    if params.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1  # smallest prefix reaching p
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return order, probs


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen=()) -> int:
    """The next token id from logits [vocab] (float, NumPy)."""
    if params.temperature == 0:
        return int(np.argmax(penalize_repetition(logits, seen, params.repetition_penalty)))
    ids, probs = distribution(logits, params, seen)
    return int(ids[rng.choice(len(ids), p=probs)])
