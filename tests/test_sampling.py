"""Sampling against HF transformers' logits processors (repetition penalty, temperature, top-k, top-p)."""
import numpy as np
import pytest

from runtime.errors import UserError
from runtime.sampling import SamplingParams, distribution, penalize_repetition, sample

torch = pytest.importorskip("torch")
gen = pytest.importorskip("transformers.generation.logits_process")


def hf_probs(logits, params, seen):
    """The distribution HF's generate would sample from, as a dense [vocab] vector."""
    scores = torch.tensor(logits, dtype=torch.float64)[None]
    ids = torch.tensor([list(seen)])
    processors = [gen.RepetitionPenaltyLogitsProcessor(params.repetition_penalty),
                  gen.TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        processors.append(gen.TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        processors.append(gen.TopPLogitsWarper(params.top_p))
    for p in processors:
        scores = p(ids, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [
    (1.0, 0, 1.0, 1.0), (0.7, 50, 1.0, 1.0), (1.3, 0, 0.9, 1.0), (0.8, 20, 0.8, 1.3), (1.0, 5, 0.5, 0.7)])
def test_distribution_matches_transformers(temperature, top_k, top_p, penalty):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 200)  # [vocab]
    seen = rng.integers(0, 200, 30)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    ids, probs = distribution(logits, params, seen)
    dense = np.zeros(200)
    dense[ids] = probs
    assert np.abs(dense - hf_probs(logits, params, seen)).max() < 1e-9


def test_greedy_is_argmax_after_penalty():
    logits = np.array([1.0, 5.0, 4.0, -2.0])
    assert sample(logits, SamplingParams(temperature=0), np.random.default_rng()) == 1
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample(logits, params, np.random.default_rng(), seen=[1]) == 2  # 5/2 < 4


def test_penalty_divides_positive_and_multiplies_negative():
    out = penalize_repetition(np.array([2.0, -2.0, 3.0]), [0, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 3.0]


def test_same_seed_same_draws():
    logits = np.random.default_rng(3).normal(0, 1, 500)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    draws = [[sample(logits, params, rng) for _ in range(20)] for rng in
             (np.random.default_rng(7), np.random.default_rng(7))]
    assert draws[0] == draws[1] and len(set(draws[0])) > 5


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -1.0, "--temperature"), ("top_k", -1, "--top-k"), ("top_p", 0.0, "--top-p"),
    ("top_p", 1.5, "--top-p"), ("repetition_penalty", 0.0, "--repetition-penalty"),
    ("max_new_tokens", 0, "--max-new-tokens"), ("seed", -3, "--seed")])
def test_options_out_of_range(field, value, message):
    with pytest.raises(UserError, match=message):
        SamplingParams(**{field: value}).check()
