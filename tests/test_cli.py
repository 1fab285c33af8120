"""The command-line tools: bad input gets its one-line message and a non-zero exit, never a traceback."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, assert_fails_with, run_script, save_tiny_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny Llama with the real Llama 2 SentencePiece tokenizer, saved HF-style."""
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(path)
    return path


def test_generates_text_and_prints_stats(tiny_model):
    result = run_script("run.py", "--model", str(tiny_model), "--max-new-tokens", "5", "--seed", "1", "Hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "prompt 2 tokens" in result.stderr and "decode" in result.stderr


def test_opt_name_goes_to_the_hub(tmp_path):
    """A short Hub name offline with an empty cache: one line naming the repository (tests/test_hub.py
    downloads from a fake Hub)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path), QLLM_MODELS_DIR=str(tmp_path / "models"))
    result = run_script("run.py", "--model", "opt-1.3b", "hi", env=env)
    assert_fails_with(result, "facebook/opt-1.3b is not (completely) in the Hugging Face cache")


def test_unknown_name_lists_what_exists():
    assert_fails_with(run_script("run.py", "--model", "no-such-model", "hi"), "not found")


def test_truncated_weights(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert_fails_with(run_script("run.py", "--model", str(broken), "hi"), "truncated or corrupt")


def test_unsupported_architecture(tiny_model, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    config.update(architectures=["BloomForCausalLM"], model_type="bloom")
    (other / "config.json").write_text(json.dumps(config))
    assert_fails_with(run_script("run.py", "--model", str(other), "hi"), "unsupported architecture")


def test_empty_prompt(tiny_model):
    assert_fails_with(run_script("run.py", "--model", str(tiny_model), "   "), "prompt is empty")


def test_prompt_longer_than_context(tiny_model):
    assert_fails_with(run_script("run.py", "--model", str(tiny_model), "word " * 40), "longer than the model's context")


@pytest.mark.parametrize("option,value", [("--temperature", "-1"), ("--top-p", "2"), ("--top-k", "-5"),
                                          ("--max-new-tokens", "0"), ("--temperature", "inf"),
                                          ("--temperature", "nan"), ("--top-p", "nan"),
                                          ("--repetition-penalty", "nan"), ("--max-new-tokens", "100000000000"),
                                          ("--temperature", "warm"), ("--top-k", "2.5"), ("--seed", "x")])
def test_option_out_of_range(tiny_model, option, value):
    """Non-finite, absurd and malformed values: one line naming the option, exit status 1."""
    assert_fails_with(run_script("run.py", "--model", str(tiny_model), option, value, "hi"), option)


def test_tiny_temperature_generates_like_greedy(tiny_model):
    outputs = [run_script("run.py", "--model", str(tiny_model), "--max-new-tokens", "6", "--temperature", t, "Hello")
               for t in ("1e-320", "0")]
    assert all(r.returncode == 0 for r in outputs), outputs[0].stderr
    assert outputs[0].stdout.strip() and outputs[0].stdout == outputs[1].stdout


@pytest.mark.parametrize("args", [("run.py", b"caf\xff"), ("eval.py", "--model", b"m\xff"),
                                  ("quantize.py", "--model", b"m\xff")], ids=["run", "eval", "quantize"])
def test_argv_that_is_not_utf8(args):
    """Bytes that are not UTF-8 on the command line: the argument is named, no traceback."""
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, timeout=300)
    stderr = result.stderr.decode("utf-8")
    assert result.returncode == 1 and "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
    position = len(args) - 1
    assert f"command-line argument {position} ({args[-1]!r}) is not valid UTF-8" in stderr, stderr


def test_empty_tag_says_so():
    assert_fails_with(run_script("run.py", "--model", "smollm2-135m.", "hi"), "has an empty quantization tag after the '.'")


def test_empty_model_name():
    assert_fails_with(run_script("run.py", "--model", "", "hi"), "the model name is empty")


def test_eval_reports_perplexity_as_json(tiny_model):
    result = run_script("eval.py", "--model", str(tiny_model), "--seqlen", "16", "--windows", "3", "--json",
                 "--no-resume")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["windows"] == 3 and out["tokens"] == 45 and 1.0 < out["ppl"] < 1e6


def test_eval_unknown_dataset():
    assert_fails_with(run_script("eval.py", "--dataset", "c4"), "--dataset c4: not a data set (wikitext2) and no such file")


@pytest.mark.parametrize("option,value", [("--seqlen", "1"), ("--seqlen", "0"), ("--seqlen", "-5"),
                                          ("--windows", "0"), ("--windows", "-2"), ("--seqlen", "abc")])
def test_eval_options_out_of_range(option, value):
    assert_fails_with(run_script("eval.py", option, value), option)
