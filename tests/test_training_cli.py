"""train.py end to end on a tiny random Llama: the adapter it writes, resume after a kill, data masking, errors.

- The adapter directory loads in runtime/lora.py and in PEFT, with the same logits.
- On a tiny random OPT (post-LN with project_in/out, as OPT-350m) the adapter it writes lowers the loss of
  the training text under the run-time forward pass, and PEFT gives the same logits with it.
- A run killed mid-step (in the process, and by a real SIGKILL of a train.py process) and resumed from
  its last checkpoint writes byte-identical adapter files to an uninterrupted run.
- JSONL records carry a loss on the response tokens (and EOS) only.
- A bad or empty data file, an unknown target and a missing base each get a one-line UserError.
"""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, save_tiny_llama

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import train  # noqa: E402
from model import Config, Model  # noqa: E402
from runtime.checkpoints.checkpoint import load_checkpoint  # noqa: E402
from runtime.errors import UserError  # noqa: E402
from runtime.lora import apply_lora, load_adapter  # noqa: E402
from runtime.text.tokenizer import Tokenizer  # noqa: E402
from pipeline.training.backward import IGNORE, Pass  # noqa: E402
from pipeline.training.data import load_dataset  # noqa: E402
from test_training_backward import save_tiny_opt  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)
TEXT = "The quick brown fox jumps over the lazy dog. " * 12
ARGS = ["--seqlen", "16", "--batch", "2", "--grad-accum", "2", "--rank", "4", "--alpha", "8", "--lr", "1e-2",
        "--warmup", "1", "--quiet"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(directory of a tiny Llama with the Llama 2 tokenizer, a text file to train on)."""
    root = tmp_path_factory.mktemp("train")
    save_tiny_llama(root / "base", **TINY)
    (root / "data.txt").write_text(TEXT)
    return root / "base", root / "data.txt"


def test_trained_adapter_gives_peft_logits(base, tmp_path):
    base_dir, data = base
    out = tmp_path / "adapter"
    train.main(["--model", str(base_dir), "--data", str(data), "--out", str(out), "--steps", "3", *ARGS])
    adapter = load_adapter(out)
    assert len(adapter.factors) == 2 * 7 and adapter.factors["model.layers.0.mlp.up_proj.weight"].scale == 2
    assert np.abs(adapter.factors["model.layers.1.self_attn.v_proj.weight"].B).max() > 0, "B must have trained"
    config, tensors = load_checkpoint(base_dir)
    ids = np.random.default_rng(0).integers(3, 32000, 12)
    model = Model(Config.from_hf(config), apply_lora(tensors, adapter))
    ours = model.prefill(ids, model.new_cache(16), all_logits=True)  # [12, vocab]
    import transformers
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    peft_model = peft.PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids)[None]).logits[0].numpy()  # [12, vocab]
    assert np.abs(ours - theirs).max() < 1e-4


def test_opt_adapter_lowers_the_loss(tmp_path):
    base_dir, data = tmp_path / "opt", tmp_path / "data.txt"
    save_tiny_opt(base_dir, do_layer_norm_before=False, word_embed_proj_dim=32, max_position_embeddings=64)
    data.write_text(TEXT)
    common = ["--model", str(base_dir), "--data", str(data), "--out", str(tmp_path / "adapter"), *ARGS]
    with pytest.raises(UserError, match="no 'gate_proj' projection; choose among q_proj, k_proj, v_proj, out_proj, "
                                        "fc1, fc2$"):
        train.main([*common, "--steps", "1", "--targets", "gate_proj"])
    train.main([*common, "--steps", "6", "--lr", "5e-2"])
    adapter = load_adapter(tmp_path / "adapter")
    assert sorted(adapter.factors) == sorted(f"model.decoder.layers.{i}.{m}.weight" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"))
    config, tensors = load_checkpoint(base_dir)
    ids = np.array(Tokenizer.load(base_dir).encode(TEXT)[:64])

    def logits_and_loss(model):
        logits = model.prefill(ids, model.new_cache(), all_logits=True)  # [64, vocab]
        shifted = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)  # [63, vocab]
        nll = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(63), ids[1:]]  # [63]
        return logits, float(nll.mean())

    _, before = logits_and_loss(Model(Config.from_hf(config), tensors))
    ours, after = logits_and_loss(Model(Config.from_hf(config), apply_lora(tensors, adapter)))
    assert after < before - 0.5, (before, after)
    import transformers
    peft_model = peft.PeftModel.from_pretrained(transformers.OPTForCausalLM.from_pretrained(base_dir),
                                                tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids)[None]).logits[0].numpy()  # [64, vocab]
    assert np.abs(ours - theirs).max() < 1e-4


def check_resume_after_kill(common: list, tmp_path, monkeypatch, kill_at: int, saved_step: int) -> None:
    """train.main(common) killed at its `kill_at`-th micro-batch, after `saved_step` steps were checkpointed,
    then resumed, writes the files of an uninterrupted run; a resume with another --lr is refused."""
    train.main([*common, "--out", str(tmp_path / "whole")])
    run, calls = Pass.run, []

    def killed(self, inputs, targets):
        calls.append(1)
        if len(calls) == kill_at:
            raise KeyboardInterrupt
        return run(self, inputs, targets)

    monkeypatch.setattr(Pass, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main([*common, "--out", str(tmp_path / "resumed")])
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())["step"] == saved_step
    monkeypatch.setattr(Pass, "run", run)
    train.main([*common, "--out", str(tmp_path / "resumed"), "--resume"])
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    with pytest.raises(UserError, match="other settings"):
        train.main([*common, "--lr", "2e-2", "--out", str(tmp_path / "resumed"), "--resume"])


def test_resume_after_kill_is_bit_identical(base, tmp_path, monkeypatch):
    base_dir, data = base
    common = ["--model", str(base_dir), "--data", str(data), "--steps", "4", "--save-every", "2",
              "--dropout", "0.1", *ARGS]
    # killed in the first micro-batch of step 4: steps 1-2 are checkpointed, step 3 is lost
    check_resume_after_kill(common, tmp_path, monkeypatch, kill_at=7, saved_step=2)


def test_resume_after_sigkill_is_bit_identical(base, tmp_path):
    # a real kill -9 of a train.py process between or during its checkpoint writes, then --resume
    base_dir, data = base
    common = ["--model", str(base_dir), "--data", str(data), "--steps", "300", "--save-every", "3", *ARGS]
    train.main([*common, "--out", str(tmp_path / "whole")])
    state = tmp_path / "killed" / "checkpoint" / "state.json"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, "--out", str(tmp_path / "killed")],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if state.is_file() and json.loads(state.read_text() or "{}").get("step", 0) >= 6:
                break
            time.sleep(0.01)
        process.kill()
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL  # killed mid-run, not finished
    done = json.loads(state.read_text())["step"]
    assert 6 <= done < 300 and not (tmp_path / "killed" / "adapter_model.safetensors").exists()
    train.main([*common, "--out", str(tmp_path / "killed"), "--resume"])
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes()


def test_jsonl_loss_is_on_the_response_only(base, tmp_path):
    base_dir, _ = base
    tokenizer = Tokenizer.load(base_dir)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "What is the capital of France?", "response": "Paris."}) + "\n\n"
                    + json.dumps({"messages": [{"role": "user", "content": "Say hi"},
                                               {"role": "assistant", "content": "Hi there"}]}) + "\n")
    dataset = load_dataset(data, tokenizer, 64, 2, 0)
    assert len(dataset.examples) == 2
    inputs, targets = dataset.examples[0]
    prompt = tokenizer.encode("What is the capital of France?")
    response = tokenizer.encode("Paris.", add_bos=False) + tokenizer.eos_ids[:1]
    assert list(inputs) == prompt + response[:-1]
    assert list(targets) == [IGNORE] * (len(prompt) - 1) + response
    batch_inputs, batch_targets = dataset.micro_batch(0)
    assert batch_inputs.shape == batch_targets.shape and (batch_targets != IGNORE).sum() == 2 + len(response) + 1


@pytest.mark.parametrize("data,extra,message", [
    ("", [], "is empty"),
    ('{"prompt": "a", "response": "b"}\n{oops\n', [], "line 2: not valid JSON"),
    ('{"prompt": "a"}\n', [], "needs \"prompt\" and \"response\""),
    (TEXT, ["--targets", "q_proj,fc1"], "no 'fc1' projection"),
    (TEXT, ["--model", "no-such-model-anywhere"], "no-such-model-anywhere"),
], ids=["empty", "bad-json", "no-response", "bad-target", "no-base"])
def test_bad_input_is_one_user_error(base, tmp_path, data, extra, message):
    base_dir, _ = base
    path = tmp_path / ("data.jsonl" if data.startswith("{") else "data.txt")
    path.write_text(data)
    with pytest.raises(UserError, match=message):
        train.main(["--model", str(base_dir), "--data", str(path), "--out", str(tmp_path / "o"), "--steps", "1",
                    *ARGS, *extra])


def test_cli_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(tmp_path / "missing.txt"),
                             "--out", str(tmp_path / "o"), "--rank", "0"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "--rank 0" in result.stderr
