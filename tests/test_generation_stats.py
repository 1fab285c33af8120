"""The generation loop's token accounting: the decode speed it reports covers what a token costs, the
decode step and the sampling of the token it runs."""
import time
from types import SimpleNamespace

import numpy as np

from runtime.generation import generate
from runtime.generation.sampling import SamplingParams


class InstantModel:
    """A model whose prefill and decode return fixed logits at once."""
    config = SimpleNamespace(max_positions=64)

    def new_cache(self, max_len):
        return SimpleNamespace(length=0, max_len=max_len)

    def prefill(self, ids, cache):
        cache.length = len(ids)
        return np.zeros(8, dtype=np.float32)

    def decode(self, token, cache):
        cache.length += 1
        return np.zeros(8, dtype=np.float32)


def test_decode_seconds_include_the_sampling(monkeypatch):
    pause = 0.02

    def slow_sample(logits, params, rng, seen):
        time.sleep(pause)
        return 3

    monkeypatch.setattr(generate, "sample", slow_sample)
    stats = generate.GenerationStats()
    tokens = list(generate.generate_ids(InstantModel(), [1, 2], SamplingParams(max_new_tokens=4), {7}, stats))
    assert tokens == [3, 3, 3, 3] and stats.decode_steps == 3
    assert stats.decode_seconds >= 3 * pause  # each of the three steps paid for its token's sampling
