"""Sampling against HF transformers' logits processors (repetition penalty, temperature, top-k, top-p),
and the checks of its options."""
import warnings

import numpy as np
import pytest

from runtime.errors import UserError
from runtime.generation.sampling import SamplingParams, distribution, nucleus, penalize_repetition, ranked, sample

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
    ("max_new_tokens", 0, "--max-new-tokens"), ("seed", -3, "--seed"),
    ("temperature", float("inf"), "--temperature"), ("temperature", float("nan"), "--temperature"),
    ("temperature", 10 ** 400, "--temperature"), ("top_p", float("nan"), "--top-p"),
    ("repetition_penalty", float("nan"), "--repetition-penalty"),
    ("repetition_penalty", float("inf"), "--repetition-penalty"), ("max_new_tokens", 10 ** 12, "--max-new-tokens")])
def test_options_out_of_range(field, value, message):
    with pytest.raises(UserError, match=message):
        SamplingParams(**{field: value}).check()


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", "5"), ("max_new_tokens", 5.0), ("top_k", 2.5), ("top_k", True), ("temperature", None),
    ("temperature", "0.7"), ("top_p", [0.9]), ("seed", 1.5), ("seed", "1"), ("repetition_penalty", False)])
def test_options_of_the_wrong_type(field, value):
    flag = field.replace("_", "-")
    with pytest.raises(UserError, match=rf"^{field} \(--{flag}\) must be (an integer|a finite number)"):
        SamplingParams(**{field: value}).check()


def test_numpy_numbers_are_accepted():
    SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), seed=np.uint8(1)).check()


def test_unknown_option_is_named():
    with pytest.raises(UserError, match="unknown option 'foo': the sampling options are temperature, top_k"):
        SamplingParams.from_options({"temperature": 0.5, "foo": 1})
    assert SamplingParams.from_options({"top_k": 3}).top_k == 3


@pytest.mark.parametrize("temperature", [1e-320, 5e-324, 1e-300, 1e-30])
def test_tiny_temperature_samples_like_greedy(temperature):
    """(logits - max) / T: the best token stays at 0, the others go to -inf, never inf - inf = NaN."""
    logits = np.random.default_rng(4).normal(0, 3, 300).astype(np.float32)  # [vocab]
    params = SamplingParams(temperature=temperature, top_k=0, top_p=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning may reach the user's terminal
        ids, probs = distribution(logits, params)
        draws = {sample(logits, params, np.random.default_rng(seed)) for seed in range(10)}
    assert probs[ids == np.argmax(logits)] == 1.0 and np.isfinite(probs).all()
    assert draws == {int(np.argmax(logits))}


def test_huge_repetition_penalty_is_silent_and_finite():
    logits = np.array([-3.0, 2.0, -1.0, 0.5], dtype=np.float32)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1e308)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, probs = distribution(logits, params, seen=[0, 1])
        greedy = sample(logits, SamplingParams(temperature=0, repetition_penalty=1e308), None, seen=[0, 1])
    assert np.isfinite(probs).all() and abs(probs.sum() - 1) < 1e-12 and greedy == 3


def test_top_k_ranking_equals_a_stable_sort():
    """`ranked` (a partition, then the top k sorted) gives the first k ids of NumPy's stable argsort of the
    descending logits: the same set and order, ties (integer logits, -inf from a tiny temperature) by id."""
    rng = np.random.default_rng(3)
    for trial in range(600):
        n = int(rng.integers(1, 200 if trial % 2 else 3000))  # up to 3000: the sampled floor under the top k
        logits = (rng.integers(-3, 3, n) if trial % 3 == 0 else rng.standard_normal(n)).astype(np.float64)
        if trial % 3 == 2:
            logits[rng.random(n) < 0.3] = -np.inf
        order = np.argsort(-logits, kind="stable")
        for k in (0, 1, int(rng.integers(1, n + 1)), n, n + 2):
            assert np.array_equal(ranked(logits, k), order[:k] if k else order)


def test_nucleus_equals_the_cut_of_the_sorted_vocabulary():
    """`nucleus` (the top 64, 512, ... tokens) keeps the ids and probabilities of the whole vocabulary sorted and
    cut where its probability first reaches p: peaked and flat distributions (the search grows to a full sort),
    ties and -inf."""
    rng = np.random.default_rng(5)
    grown = 0
    for trial in range(300):
        n = int(rng.integers(1, 6000))
        spread = (0.3, 3.0, 10.0)[trial % 3]  # flat to peaked
        logits = rng.standard_normal(n) * spread
        if trial % 4 == 1:
            logits = np.round(logits)  # ties
        if trial % 4 == 2:
            logits[rng.random(n) < 0.3] = -np.inf
        logits = logits - logits.max()
        order = np.argsort(-logits, kind="stable")
        probs = np.exp(logits[order])
        probs /= probs.sum()
        for top_p in (0.05, 0.5, 0.9, 0.999):
            keep = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
            ids, kept = nucleus(logits, top_p)
            assert np.array_equal(ids, order[:keep])
            assert np.abs(kept - probs[:keep] / probs[:keep].sum()).max() < 1e-12
            grown += keep > 64
    assert grown > 50  # the search went past its first 64 tokens in many cases
