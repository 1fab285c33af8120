"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Applied in the order of HF transformers' `generate`: repetition penalty
(Keskar et al. 2019, CTRL: a seen token's logit is divided by the penalty when
positive, multiplied when negative), temperature, top-k, top-p (nucleus
sampling, Holtzman et al. 2020: the smallest set of most likely tokens whose
probability reaches p). Temperature 0 means greedy (argmax).

Any positive temperature is safe, however small: the largest logit is
subtracted before dividing (in float64), so the best token's scaled logit is
exactly 0 and the others go to -inf as T -> 0 instead of inf - inf = NaN; a
tiny temperature therefore samples like greedy decoding, its limit.
Options are checked for type and range (finite numbers, integers where
counts are meant) before anything runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

from runtime.errors import UserError


MAX_NEW_TOKENS = 1_000_000  # far beyond any context this runtime runs; a larger value is a typo
SAMPLE_STRIDE = 8  # every how many logits `ranked` samples for a floor under the top k
NUCLEUS_FIRST, NUCLEUS_GROWTH = 64, 8  # the most likely tokens `nucleus` looks among first, and the growth


def is_number(value, integer: bool) -> bool:
    """True for an integer (`integer`) or a finite real number (not `integer`); bools and strings are neither."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if integer:
        return isinstance(value, (int, np.integer))
    if not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def option(default, integer: bool, in_range, allowed: str):
    """A field of SamplingParams with its check: integer (else a finite number), in range, the range in words."""
    return field(default=default, metadata={"integer": integer, "in_range": in_range, "allowed": allowed})


@dataclass
class SamplingParams:
    """The options of one generation, as the CLI and the Python API take them."""
    temperature: float = option(0.7, False, lambda v: v >= 0, ">= 0 (0 means greedy)")
    top_k: int = option(50, True, lambda v: v >= 0, ">= 0 (0 disables it)")
    top_p: float = option(0.9, False, lambda v: 0 < v <= 1, "in (0, 1] (1 disables it)")
    repetition_penalty: float = option(1.0, False, lambda v: v > 0, "> 0 (1 disables it)")
    seed: int | None = option(None, True, lambda v: v >= 0, ">= 0 (or None for a random seed)")
    max_new_tokens: int = option(128, True, lambda v: 1 <= v <= MAX_NEW_TOKENS, f"between 1 and {MAX_NEW_TOKENS}")

    @classmethod
    def from_options(cls, options: dict) -> "SamplingParams":
        """Checked params from keyword options (the Python API's **options); UserError for an unknown one."""
        names = [f.name for f in fields(cls)]
        unknown = [name for name in options if name not in names]
        if unknown:
            raise UserError(f"unknown option {unknown[0]!r}: the sampling options are {', '.join(names)}")
        return cls(**options).check()

    def check(self) -> "SamplingParams":
        """Raise UserError for any option of the wrong type or out of its range; return self."""
        for option_field in fields(self):
            name, rule = option_field.name, option_field.metadata
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            if not is_number(value, rule["integer"]) or not rule["in_range"](value):
                kind = "an integer" if rule["integer"] else "a finite number"
                raise UserError(f"{name} (--{name.replace('_', '-')}) must be {kind} {rule['allowed']}, "
                                f"got {value!r:.40}")
        return self


def penalize_repetition(logits: np.ndarray, seen, penalty: float) -> np.ndarray:
    """CTRL's repetition penalty on the logits [vocab] of every token id in `seen`."""
    if penalty == 1.0 or not len(seen):
        return logits
    logits = logits.astype(np.float64)  # a copy, wide enough that a large penalty rarely overflows
    ids = np.unique(np.asarray(seen))
    chosen = logits[ids]
    with np.errstate(over="ignore", under="ignore"):  # a seen token pushed to -inf is simply never drawn
        logits[ids] = np.where(chosen > 0, chosen / penalty, chosen * penalty)
    return logits


def ranked(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Token ids by descending logit, ties by ascending id (a stable sort's order): all of them, or with top_k
    the first top_k of that order, sorted among themselves after partitions (sorting the whole vocabulary each
    token took 4.6 ms, longer than a SmolLM2 decode step). The top_k-th largest of every SAMPLE_STRIDE-th logit
    is at most the vocabulary's, so the logits at or above it hold the top_k (about SAMPLE_STRIDE * top_k of
    them): the exact partition runs on those (0.36 -> ~0.1 ms for 49152 logits)."""
    if not top_k or top_k >= logits.shape[0]:
        return np.argsort(-logits, kind="stable")
    sample = logits[::SAMPLE_STRIDE]
    if sample.shape[0] > top_k:
        floor = np.partition(sample, sample.shape[0] - top_k)[sample.shape[0] - top_k]
        candidates = np.flatnonzero(logits >= floor)  # ascending ids
    else:
        candidates = np.arange(logits.shape[0])
    values = logits[candidates]
    threshold = np.partition(values, values.shape[0] - top_k)[values.shape[0] - top_k]  # the top_k-th largest
    above = candidates[values > threshold]
    chosen = np.concatenate([above, candidates[values == threshold][:top_k - above.shape[0]]])  # [top_k]
    return chosen[np.lexsort((chosen, -logits[chosen]))]


def nucleus(logits: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of most likely tokens whose probability (over the whole vocabulary) reaches top_p, most
    likely first, and their probabilities renormalized; logits [vocab] float64 with the largest at 0. The set is
    looked for among the top NUCLEUS_FIRST tokens (`ranked`), then NUCLEUS_GROWTH times as many, and so on: a
    peaked distribution never sorts the vocabulary (4.6 ms for 49152 logits, longer than a SmolLM2 decode step)."""
    weights = np.exp(logits)  # [vocab] at most 1
    total = weights.sum()  # >= 1: the best token's weight is 1
    top_k = NUCLEUS_FIRST
    while True:
        order = ranked(logits, top_k)  # [top_k, or vocab]
        reached = np.cumsum(weights[order]) / total  # [top_k]
        if reached[-1] >= top_p or order.shape[0] == logits.shape[0]:
            keep = min(int(np.searchsorted(reached, top_p)) + 1, order.shape[0])  # smallest prefix reaching p
            chosen = weights[order[:keep]]  # [keep]
            return order[:keep], chosen / chosen.sum()
        top_k *= NUCLEUS_GROWTH


def distribution(logits: np.ndarray, params: SamplingParams, seen=()) -> tuple[np.ndarray, np.ndarray]:
    """The token ids that may be drawn and their probabilities, from logits [vocab]; temperature > 0. Ids most
    likely first where top-k or top-p cut the vocabulary, else every id in ascending order."""
    logits = penalize_repetition(logits.astype(np.float64), seen, params.repetition_penalty)
    with np.errstate(over="ignore"):  # a tiny temperature sends all but the best tokens to -inf: probability 0
        logits = (logits - logits.max()) / params.temperature  # the best token at exactly 0
    if not params.top_k or params.top_k >= logits.shape[0]:
        if params.top_p < 1:
            return nucleus(logits, params.top_p)
        probs = np.exp(logits)  # [vocab]
        return np.arange(logits.shape[0]), probs / probs.sum()
    order = ranked(logits, params.top_k)  # token ids, most likely first
    probs = np.exp(logits[order])  # probs[0] = 1, so the sum is >= 1
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
