"""Real checkpoints end to end: SmolLM2-135M (GGUF and its float conversion) and stories260K."""
import numpy as np
import pytest

from conftest import STORIES260K
from model import Config, Model
from pipeline.api import load
from runtime.checkpoints.checkpoint import load_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT_IDS = [1, 504, 3458, 282, 4649, 314, 3]  # arbitrary SmolLM2 ids, BOS first
# Greedy continuation of STORIES_PROMPT by stories260K, computed once with this runtime and checked
# against HF transformers in test_stories260k_golden_agrees_with_transformers.
STORIES_PROMPT = [1, 403, 407, 261, 378, 401]
STORIES_GOLDEN = [306, 430, 430, 430, 327, 473, 473, 372, 446, 465, 465, 465, 465, 465, 465, 465, 465, 465, 465, 465,
                  465, 465, 465, 465, 473, 372, 372, 347, 283, 340, 403, 363, 293, 430, 283, 463, 302, 465, 465, 465]


def greedy(model, prompt, steps):
    cache = model.new_cache(len(prompt) + steps)
    logits, out = model.prefill(prompt, cache), []
    for _ in range(steps):
        out.append(int(np.argmax(logits)))
        logits = model.decode(out[-1], cache)
    return out


def test_smollm2_knows_the_capital_of_france(smollm2_dir):
    text = load(str(smollm2_dir)).generate("The capital of France is", temperature=0, max_new_tokens=8)
    assert "Paris" in text


def test_converted_checkpoint_gives_the_logits_of_the_gguf(smollm2_dir, smollm2_gguf):
    ours = [Model(Config.from_hf(c), t) for c, t in (load_checkpoint(smollm2_dir), load_checkpoint(smollm2_gguf))]
    a, b = (m.prefill(PROMPT_IDS, m.new_cache(16), all_logits=True) for m in ours)
    assert np.array_equal(a, b)


def test_gguf_logits_match_transformers_reading_the_same_gguf(smollm2_gguf):
    """transformers dequantizes GGUF and undoes the Q/K permutation with its own code."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT_IDS])).logits[0].numpy()  # [T, vocab]
    model = Model(*(lambda c, t: (Config.from_hf(c), t))(*load_checkpoint(smollm2_gguf)))
    ours = model.prefill(PROMPT_IDS, model.new_cache(16), all_logits=True)
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()


def test_stories260k_greedy_continuation_matches_golden():
    config, tensors = load_checkpoint(STORIES260K)
    assert greedy(Model(Config.from_hf(config), tensors), STORIES_PROMPT, 40) == STORIES_GOLDEN


def test_stories260k_golden_agrees_with_transformers():
    config, tensors = load_checkpoint(STORIES260K)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")})).eval()
    hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=False)
    ids = list(STORIES_PROMPT)
    with torch.no_grad():
        for _ in range(40):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    assert ids[len(STORIES_PROMPT):] == STORIES_GOLDEN


def test_api_stream_generate_and_score_agree(smollm2_dir):
    llm = load(str(smollm2_dir))
    pieces = list(llm.stream("Once upon a time", temperature=0.8, seed=3, max_new_tokens=12))
    assert "".join(pieces) == llm.generate("Once upon a time", temperature=0.8, seed=3, max_new_tokens=12)
    assert llm.last_stats.generated_tokens >= 1
    score = llm.score("The cat sat on the mat.")
    assert len(score.logprobs) == len(score.token_ids) - 1 and np.all(score.logprobs <= 0)
    model = llm.model  # the score of the last token equals the decode path's log-probability
    cache = model.new_cache(32)
    model.prefill(score.token_ids[:-2], cache)
    logits = model.decode(score.token_ids[-2], cache).astype(np.float64)
    expected = logits[score.token_ids[-1]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert abs(score.logprobs[-1] - expected) < 1e-3


def test_chat_prompt_uses_chatml(smollm2_dir):
    llm = load(str(smollm2_dir))
    ids = llm.encode_prompt("Hi", chat=True)
    assert ids[0] == 1 and llm.tokenizer.decode(ids).rstrip().endswith("assistant")
