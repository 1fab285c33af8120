"""Bad input to the Python API and to generation: one-line UserErrors from the entry point's own checks.

Wrong types and unknown keywords in load / generate / stream / score, a model
whose logits are not finite (NaN weights, float32 overflow), a chat template
that renders nothing, and the tiny temperatures that used to turn into NaN.
"""
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, save_tiny_llama
from pipeline.api import load
from runtime.errors import UserError
from runtime.checkpoints.safetensors_io import read_safetensors, write_safetensors

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny Llama with the real Llama 2 SentencePiece tokenizer, saved HF-style."""
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(path)
    return path


@pytest.fixture(scope="module")
def llm(tiny_model):
    return load(str(tiny_model))


def edited_model(source, target, name: str, value: float):
    """A copy of the model at `source` in `target` with every element of tensor `name` set to `value`."""
    shutil.copytree(source, target)
    tensors, metadata = read_safetensors(target / "model.safetensors")
    tensors = {k: np.array(v) for k, v in tensors.items()}
    tensors[name][...] = value
    write_safetensors(target / "model.safetensors", tensors, metadata)
    return target


def raises_one_line(match: str):
    """pytest.raises for a UserError whose message matches `match` (checked to be one line by the caller)."""
    return pytest.raises(UserError, match=match)


@pytest.mark.parametrize("args,kwargs,message", [
    ((123,), {}, "the model name must be a str or a path, got int"),
    ((b"smollm2-135m",), {}, "the model name must be a str or a path, got bytes"),
    (("",), {}, "the model name is empty"),
    (("   ",), {}, "the model name is empty"),
    ((None,), {"device": "gpu"}, "unknown device 'gpu': use one of cpu, cuda"),
    ((None,), {"device": None}, "unknown device None"),
    ((None,), {"lora": 5}, "the LoRA adapter must be a str or a path, got int"),
    ((None,), {"lora": ""}, "the LoRA adapter is empty"),
])
def test_load_checks_its_arguments(args, kwargs, message):
    with raises_one_line(message) as caught:
        load(*args, **kwargs)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("method,args,kwargs,message", [
    ("generate", (None,), {}, "the prompt must be a str, got NoneType"),
    ("generate", (b"hi",), {}, "the prompt must be a str, got bytes"),
    ("generate", ("hi",), {"max_new_tokens": "5"}, r"max_new_tokens \(--max-new-tokens\) must be an integer"),
    ("generate", ("hi",), {"top_k": 2.5}, r"top_k \(--top-k\) must be an integer"),
    ("generate", ("hi",), {"temperature": None}, r"temperature \(--temperature\) must be a finite number"),
    ("generate", ("hi",), {"temperature": float("inf")}, r"temperature \(--temperature\) must be a finite"),
    ("generate", ("hi",), {"seed": 1.5}, r"seed \(--seed\) must be an integer"),
    ("generate", ("hi",), {"chat": "yes"}, "chat must be True or False"),
    ("generate", ("hi",), {"system": 3}, "the system message must be a str, got int"),
    ("generate", ("hi",), {"foo": 1}, "unknown option 'foo'"),
    ("stream", ("x",), {"foo": 1}, "unknown option 'foo'"),
    ("stream", (None,), {}, "the prompt must be a str"),
    ("stream", ("   ",), {}, "the prompt is empty"),
    ("stream", ("hi",), {"top_p": float("nan")}, r"top_p \(--top-p\) must be a finite number"),
    ("score", (None,), {}, "the text to score must be a str, got NoneType"),
    ("score", (5,), {}, "the text to score must be a str, got int"),
])
def test_calls_check_their_arguments_when_called(llm, method, args, kwargs, message):
    """Each raises from the call itself: stream() checks before returning its iterator, not at the first piece."""
    with raises_one_line(message) as caught:
        getattr(llm, method)(*args, **kwargs)
    assert "\n" not in str(caught.value)


def test_stream_is_checked_then_iterates(llm):
    pieces = llm.stream("Hello", max_new_tokens=3, temperature=0)
    assert not llm.last_stats.generated_tokens  # nothing ran yet
    assert "".join(pieces) == llm.generate("Hello", max_new_tokens=3, temperature=0)


@pytest.mark.parametrize("temperature", [1e-320, 1e-300])
def test_tiny_temperature_generates_like_greedy(llm, temperature):
    greedy = llm.generate("Hello", max_new_tokens=6, temperature=0)
    assert llm.generate("Hello", max_new_tokens=6, temperature=temperature, seed=3) == greedy


@pytest.mark.parametrize("name,value", [("model.layers.0.mlp.down_proj.weight", np.nan),
                                        ("lm_head.weight", 3e38)], ids=["nan-weights", "float32-overflow"])
def test_non_finite_logits_are_an_error(tiny_model, tmp_path, name, value):
    """NaN weights, or finite ones whose products overflow float32: an error, never NaN sampled or scored."""
    broken = load(str(edited_model(tiny_model, tmp_path / "broken", name, value)))
    for call in (lambda: broken.generate("Hello", max_new_tokens=3), lambda: broken.generate("Hello", temperature=0),
                 lambda: broken.score("Hello world")):
        with raises_one_line(r"the model produced non-finite values \(NaN or infinity\) in its logits"):
            call()


@pytest.mark.parametrize("name,value", [("model.layers.0.mlp.down_proj.weight", np.nan),
                                        ("lm_head.weight", 3e38)], ids=["nan-weights", "float32-overflow"])
def test_non_finite_logits_in_the_cli(tiny_model, tmp_path, name, value):
    """Exit status 1 and the error as the only line: no NumPy overflow warning before it."""
    broken = edited_model(tiny_model, tmp_path / "broken", name, value)
    result = subprocess.run([sys.executable, "run.py", "--model", str(broken), "--max-new-tokens", "3", "Hello"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: the model produced non-finite values")
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_chat_template_that_renders_nothing(tiny_model):
    llm = load(str(tiny_model))
    llm.tokenizer.chat_template = "{% if false %}{{ messages }}{% endif %}"
    with raises_one_line("chat template of .* rendered nothing for this prompt: fix its chat_template"):
        llm.generate("Hello", chat=True)
