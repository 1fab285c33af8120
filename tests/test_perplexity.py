"""Perplexity protocol: windows, the exp-mean-NLL formula against transformers' loss, and resuming."""
import numpy as np
import pytest

from model import Config, Model
from runtime.errors import UserError
from pipeline.perplexity import perplexity, state_path, windows_of

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=50, max_position_embeddings=64, initializer_range=0.3)).eval()
    ours = Model(Config.from_hf(hf.config.to_dict()), {k: v.numpy() for k, v in hf.state_dict().items()})
    return hf, ours


def test_windows_drop_the_tail():
    windows = windows_of(list(range(10)), 3)
    assert [list(w) for w in windows] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert len(windows_of(list(range(10)), 3, limit=2)) == 2
    with pytest.raises(UserError, match="fewer than one window"):
        windows_of([1, 2], 3)


def test_matches_transformers_loss(tiny):
    """GPTQ's eval: exp of the mean of transformers' per-window cross-entropy loss."""
    hf, ours = tiny
    ids = np.random.default_rng(0).integers(0, 50, 100)
    with torch.no_grad():
        losses = [hf(torch.tensor(w[None]), labels=torch.tensor(w[None])).loss.item() for w in windows_of(ids, 16)]
    result = perplexity(ours, ids, 16, progress=False)
    assert result["windows"] == 6 and result["tokens"] == 6 * 15
    assert result["ppl"] == pytest.approx(np.exp(np.mean(losses)), rel=1e-5)


def test_interrupted_run_resumes_to_the_same_number(tiny, tmp_path):
    _, ours = tiny
    ids = np.random.default_rng(1).integers(0, 50, 200)
    state = tmp_path / "state.json"
    fresh = perplexity(ours, ids, 20, progress=False)
    perplexity(ours, ids, 20, limit=4, state_path=state, progress=False)  # "interrupted" after 4 windows
    calls = []
    original = ours.prefill
    ours.prefill = lambda *a, **k: calls.append(1) or original(*a, **k)
    resumed = perplexity(ours, ids, 20, state_path=state, progress=False)
    ours.prefill = original
    assert len(calls) == fresh["windows"] - 4  # only the missing windows were run
    assert resumed["ppl"] == fresh["ppl"]


def test_saved_windows_belong_to_one_activation_mode(tmp_path, monkeypatch):
    # a run with int8 activations everywhere must not hand its windows to a float run, nor back
    (tmp_path / "model").mkdir()
    keys = {}
    for mode in ("float", "int8-all", "int8"):
        monkeypatch.setenv("QLLM_ACTIVATIONS", mode)
        keys[mode] = state_path(tmp_path / "model", [1, 2, 3], 16)
    assert len(set(keys.values())) == 3
    monkeypatch.setenv("QLLM_ACTIVATIONS", "float")
    assert state_path(tmp_path / "model", [1, 2, 3], 16) == keys["float"]


def test_saved_windows_belong_to_one_version_of_the_forward_pass(tmp_path, monkeypatch):
    # windows scored by other kernels (an edited runtime/ or model.py) must not resume into a new number
    import pipeline.perplexity as perplexity_module
    (tmp_path / "model").mkdir()
    (tmp_path / "runtime").mkdir()
    (tmp_path / "model.py").write_text("forward = 1\n")
    (tmp_path / "runtime" / "kernel.py").write_text("k = 1\n")
    monkeypatch.setattr(perplexity_module, "PROJECT_ROOT", tmp_path)
    before = state_path(tmp_path / "model", [1, 2, 3], 16)
    assert state_path(tmp_path / "model", [1, 2, 3], 16) == before
    (tmp_path / "runtime" / "kernel.py").write_text("k = 2\n")
    after_kernel = state_path(tmp_path / "model", [1, 2, 3], 16)
    (tmp_path / "model.py").write_text("forward = 2\n")
    after_model = state_path(tmp_path / "model", [1, 2, 3], 16)
    assert len({before, after_kernel, after_model}) == 3
