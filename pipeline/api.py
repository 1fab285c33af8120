"""The Python API for embedding the runtime in an application.

    from pipeline.api import load
    llm = load("smollm2-135m")                   # once: name, directory or file
    for piece in llm.stream("Once upon a time", max_new_tokens=40):
        print(piece, end="", flush=True)
    text = llm.generate("The capital of France is", temperature=0)
    result = llm.score("The cat sat on the mat.")  # log-likelihood of each token
    tuned = load("smollm2-135m.nf4", lora="my-adapter")  # a PEFT LoRA adapter on top

The options are those of `run.py` (see `runtime.generation.sampling.SamplingParams`).
Every entry point checks its arguments (types, unknown keywords, ranges) when
it is called, `stream` included, and raises `UserError` with a one-line
message; non-finite logits also raise `UserError` instead of being sampled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model import Config, Model
from runtime.checkpoints.checkpoint import load_checkpoint
from runtime.device import DEVICES, array_module
from runtime.errors import UserError
from runtime.generation.generate import GenerationStats, check_prompt, finite_logits, generate_text
from runtime.checkpoints.importers import is_quantized_checkpoint, load_quantized_checkpoint
from runtime.lora import apply_lora, load_adapter
from runtime.checkpoints.packed_checkpoint import is_packed_model, load_packed
from pipeline.first_use import find_or_build
from runtime.generation.sampling import SamplingParams
from runtime.text.tokenizer import Tokenizer
from runtime.checkpoints.verify import verify_model


@dataclass
class Score:
    """Log-likelihoods of a text under the model."""
    token_ids: list            # the tokens of the text (BOS included when the model adds one)
    logprobs: np.ndarray       # [len(token_ids) - 1]: log p(token i+1 | tokens ..i)

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())

    @property
    def perplexity(self) -> float:
        return float(np.exp(-self.logprobs.mean()))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, computed stably in float64."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_logprobs(model: Model, token_ids) -> np.ndarray:
    """log p(token i+1 | tokens ..i) for i < T-1, in one prefill: [T-1]."""
    logits = finite_logits(lambda: model.prefill(token_ids[:-1], model.new_cache(len(token_ids)), all_logits=True))
    logp = log_softmax(logits)  # [T-1, vocab]
    return logp[np.arange(len(token_ids) - 1), np.asarray(token_ids[1:])]  # [T-1]


def require_str(value, what: str) -> str:
    """`value` when it is a str; UserError naming `what` otherwise."""
    if not isinstance(value, str):
        raise UserError(f"{what} must be a str, got {type(value).__name__}")
    return value


def path_text(value, what: str, fix: str) -> str:
    """`value` (a str or path object) as a non-empty str; UserError naming `what` and ending in `fix`."""
    if not isinstance(value, (str, os.PathLike)) or not isinstance(os.fspath(value), str):
        raise UserError(f"{what} must be a str or a path, got {type(value).__name__}; {fix}")
    text = os.fspath(value)
    if not text.strip():
        raise UserError(f"{what} is empty; {fix}")
    return text


def load_model(path: Path, device: str = "cpu", lora: str | None = None) -> Model:
    """The model stored at `path` (any checkpoint the loader reads), on `device`, with the LoRA
    adapter in directory `lora` applied at run time when given."""
    adapter = load_adapter(lora) if lora is not None else None  # a bad adapter fails before the model loads
    if is_packed_model(path):
        hf_config, tensors = load_packed(path)
    elif is_quantized_checkpoint(path):  # GPTQ, AWQ, bitsandbytes, QuIP# (runtime/importers)
        hf_config, tensors = load_quantized_checkpoint(path)
    else:
        hf_config, tensors = load_checkpoint(path)
    if adapter is not None:
        tensors = apply_lora(tensors, adapter)
    return Model(Config.from_hf(hf_config), tensors, array_module(device))


def load_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer stored with the checkpoint at `path`, or None when it has none (llama2.c)."""
    if path.suffix == ".bin":
        return None
    return Tokenizer.load(path)


class LLM:
    """A loaded model with its tokenizer: generate, stream and score text."""

    def __init__(self, model: Model, tokenizer: Tokenizer | None, path: Path):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.last_stats = GenerationStats()

    def encode_prompt(self, prompt: str, chat: bool = False, system: str | None = None) -> list:
        """Token ids of the prompt, wrapped in the chat template when `chat`."""
        require_str(prompt, "the prompt")
        if not isinstance(chat, bool):
            raise UserError(f"chat must be True or False, got {chat!r:.40}")
        if system is not None:
            require_str(system, "the system message")
        if self.tokenizer is None:
            raise UserError(f"{self.path} has no tokenizer: only token ids can be run through it")
        if not prompt.strip():
            raise UserError("the prompt is empty: give some text to continue")
        if not chat:
            return self.tokenizer.encode(prompt)
        text = self.tokenizer.apply_chat_template(prompt, system)
        if not text.strip():
            raise UserError(f"the chat template of {self.path} rendered nothing for this prompt: fix its "
                            f"chat_template (tokenizer_config.json) or send the prompt without chat")
        return self.tokenizer.encode(text, add_bos=False)

    def stream(self, prompt: str, chat: bool = False, system: str | None = None, **options):
        """An iterator over the continuation of `prompt`, piece by piece; `options` as SamplingParams.

        Not a generator function: the arguments are checked (UserError) when it is called, not at the
        first piece."""
        params = SamplingParams.from_options(options)
        ids = self.encode_prompt(prompt, chat, system)
        check_prompt(ids, self.model.config.max_positions)
        self.last_stats = GenerationStats()
        return generate_text(self.model, self.tokenizer, ids, params, self.last_stats)

    def generate(self, prompt: str, chat: bool = False, system: str | None = None, **options) -> str:
        """The whole continuation of `prompt` as one string."""
        return "".join(self.stream(prompt, chat, system, **options))

    def score(self, text: str) -> Score:
        """Log-likelihood of every token of `text` after the first."""
        ids = self.encode_prompt(require_str(text, "the text to score"))
        if len(ids) < 2:
            raise UserError("scoring needs at least two tokens of text")
        if len(ids) > self.model.config.max_positions:
            raise UserError(f"the text is {len(ids)} tokens, longer than the context of "
                            f"{self.model.config.max_positions}: score it in pieces")
        return Score(list(ids), token_logprobs(self.model, ids))


def load(name_or_path: str | None = None, device: str = "cpu", lora: str | None = None,
         verify: bool = False) -> LLM:
    """Load a model by name (models/NAME, or BASE.TAG built on first use), directory or file.

    None gives the default model. `lora`: a PEFT LoRA adapter directory to apply on top
    (float or quantized base; see runtime/lora.py). `verify`: check every tensor in full
    first (recorded checksums, finite values; see runtime/checkpoints/verify.py).
    """
    if not isinstance(verify, bool):
        raise UserError(f"verify must be True or False, not {verify!r:.40}")
    if name_or_path is not None:
        name_or_path = path_text(name_or_path, "the model name", "give a name under models/ (e.g. smollm2-135m), "
                                 "a directory or a file, or None for the default model")
    if lora is not None:
        lora = path_text(lora, "the LoRA adapter", "give the adapter's directory, or None")
    if not isinstance(device, str) or device not in DEVICES:
        raise UserError(f"unknown device {device!r:.40}: use one of {', '.join(DEVICES)}")
    path = find_or_build(name_or_path)
    if verify:
        verify_model(path)
    return LLM(load_model(path, device, lora), load_tokenizer(path), path)
