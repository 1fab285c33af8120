"""The generation loop: prefill the prompt, then decode token by token, streaming text.

One prefill over the whole prompt, then one decode per new token through the
KV cache (llama2.c's loop), stopping at an end-of-sequence token, at
`max_new_tokens` or when the context is full. Text comes out through the
tokenizer's stream decoder, so no half UTF-8 character is ever yielded.
Logits that are not all finite (NaN weights, an adapter that overflows)
stop generation with a UserError instead of being sampled.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from runtime.device import to_numpy
from runtime.errors import UserError
from runtime.generation.sampling import SamplingParams, sample


@dataclass
class GenerationStats:
    """Token counts and timings of one generation."""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_seconds: float = 0.0  # each decode step with the sampling of the token it runs: what a token costs

    def summary(self) -> str:
        """One line: token counts and prefill / decode speed."""
        prefill = self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0
        decode = self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0
        return (f"prompt {self.prompt_tokens} tokens, generated {self.generated_tokens} tokens, "
                f"prefill {prefill:.1f} tokens/s, decode {decode:.1f} tokens/s")


def check_prompt(prompt_ids, context: int):
    """UserError for an empty prompt or one that leaves no room in the context."""
    if len(prompt_ids) == 0:
        raise UserError("the prompt is empty: give some text to continue")
    if len(prompt_ids) >= context:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens, longer than the model's context of "
                        f"{context}: shorten it")


def finite_logits(forward) -> np.ndarray:
    """The logits that `forward()` (one model call) returns, as NumPy; UserError if any is not finite.

    NumPy's overflow / invalid-value warnings are silenced during the call: the
    non-finite values they warn about are reported here, in one line."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        logits = to_numpy(forward())
    if not np.isfinite(logits).all():
        raise UserError("the model produced non-finite values (NaN or infinity) in its logits: its weights or "
                        "LoRA adapter hold NaN/infinite values or overflow float32; re-download or rebuild the "
                        "model and check the adapter")
    return logits


def generate_ids(model, prompt_ids, params: SamplingParams, eos_ids, stats: GenerationStats):
    """Yield new token ids after `prompt_ids`, recording counts and timings in `stats`."""
    params.check()
    context = model.config.max_positions
    check_prompt(prompt_ids, context)
    rng = np.random.default_rng(params.seed)
    cache = model.new_cache(min(context, len(prompt_ids) + params.max_new_tokens))
    stats.prompt_tokens = len(prompt_ids)
    start = time.perf_counter()
    logits = finite_logits(lambda: model.prefill(prompt_ids, cache))  # [vocab]
    stats.prefill_seconds = time.perf_counter() - start
    seen = list(prompt_ids)
    while True:
        start = time.perf_counter()
        token = sample(logits, params, rng, seen)
        sampling = time.perf_counter() - start
        if token in eos_ids:
            return
        seen.append(token)
        stats.generated_tokens += 1
        yield token
        if stats.generated_tokens == params.max_new_tokens or cache.length == cache.max_len:
            return
        start = time.perf_counter()
        logits = finite_logits(lambda: model.decode(token, cache))  # [vocab]
        stats.decode_seconds += time.perf_counter() - start + sampling
        stats.decode_steps += 1


def generate_text(model, tokenizer, prompt_ids, params: SamplingParams, stats: GenerationStats):
    """Yield text pieces of the continuation of `prompt_ids` as they become final."""
    stream = tokenizer.stream()
    for token in generate_ids(model, prompt_ids, params, tokenizer.eos_ids, stats):
        text = stream.push(token)
        if text:
            yield text
    tail = stream.flush()
    if tail:
        yield tail
