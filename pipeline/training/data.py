"""Training data for LoRA fine-tuning: packed text windows, or prompt/response records with response-only loss.

- A plain text file is tokenized whole and cut into windows of seqlen + 1
  tokens that overlap by one (causal-LM loss on every token), as in LoRA's
  (Hu et al. 2021) and QLoRA's (Dettmers et al. 2023) language-modelling runs.
- A JSONL file (`.jsonl` / `.json`) holds one record per line, either
  {"prompt": ..., "response": ...} (optionally "system") or {"messages":
  [{"role": "system", ...}?, {"role": "user", ...}, {"role": "assistant",
  ...}]}. The prompt goes through the model's chat template (plain text when
  it has none), the response follows and ends with EOS, and only the
  response's tokens carry a loss (QLoRA §5: training on the target only).

Each example is (inputs [n], targets [n]): targets[t] is the token after
inputs[t], or IGNORE. The order is a permutation per epoch drawn from
(seed, epoch), so micro-batch j is a pure function of (seed, j): that index is
the whole data position a checkpoint needs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from runtime.errors import UserError
from runtime.text.tokenizer import Tokenizer
from pipeline.training.backward import IGNORE

JSONL_SUFFIXES = (".jsonl", ".json")


class Dataset:
    """Examples and the micro-batches cut from them."""

    def __init__(self, examples: list, batch: int, seed: int):
        self.examples, self.batch, self.seed = examples, batch, seed  # [(inputs [n], targets [n]), ...]

    @property
    def per_epoch(self) -> int:
        """Micro-batches in one pass over the examples (the last one may be smaller)."""
        return math.ceil(len(self.examples) / self.batch)

    def micro_batch(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Micro-batch j (counted over all epochs): inputs and targets [B, T], right-padded with IGNORE
        targets to the longest example (pad inputs are token 0: causal attention never lets earlier
        positions see them)."""
        epoch, index = divmod(j, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))  # [n_examples]
        chosen = [self.examples[k] for k in order[index * self.batch:(index + 1) * self.batch]]
        T = max(len(inputs) for inputs, _ in chosen)
        inputs = np.zeros((len(chosen), T), dtype=np.int64)  # [B, T]
        targets = np.full((len(chosen), T), IGNORE, dtype=np.int64)  # [B, T]
        for row, (ids, tgt) in enumerate(chosen):
            inputs[row, :len(ids)] = ids
            targets[row, :len(tgt)] = tgt
        return inputs, targets


def read_text(path: Path) -> str:
    """The file's text; UserError for a missing, unreadable, non-UTF-8 or empty file."""
    if not path.is_file():
        raise UserError(f"--data {path} does not exist or is not a file: give a text or JSONL file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"--data {path} is not UTF-8 text (byte {err.start}): convert it to UTF-8") from None
    except OSError as err:
        raise UserError(f"--data {path} cannot be read ({err.strerror})") from None
    if not text.strip():
        raise UserError(f"--data {path} is empty: give some training text or records")
    return text


def text_examples(tokenizer: Tokenizer, text: str, seqlen: int) -> list:
    """Windows of seqlen + 1 tokens overlapping by one: (inputs [<= seqlen], targets = the next tokens)."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)  # [N]
    return [(ids[s:s + seqlen], ids[s + 1:s + seqlen + 1]) for s in range(0, len(ids) - 1, seqlen)]


def record_parts(record, where: str) -> tuple:
    """(system or None, prompt, response) of one JSONL record; UserError naming `where` if malformed."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: a record must be a JSON object with prompt/response or messages")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise UserError(f"{where}: messages must be a list of {{role, content}} objects")
        roles = [m.get("role") for m in messages]
        system = messages[0].get("content") if roles[:1] == ["system"] else None
        turn = messages[1:] if system is not None else messages
        if [m.get("role") for m in turn] != ["user", "assistant"]:
            raise UserError(f"{where}: messages must be an optional system message, one user message and one "
                            f"assistant message (got roles {roles}); split longer chats into such records")
        parts = (system, turn[0].get("content"), turn[1].get("content"))
    elif "prompt" in record and "response" in record:
        parts = (record.get("system"), record["prompt"], record["response"])
    else:
        raise UserError(f"{where}: a record needs \"prompt\" and \"response\", or \"messages\"")
    if not all(isinstance(p, str) for p in parts[1:]) or not (parts[0] is None or isinstance(parts[0], str)):
        raise UserError(f"{where}: prompt, response and message contents must be strings")
    if not parts[2].strip():
        raise UserError(f"{where}: the response is empty; there is nothing to learn from this record")
    return parts


def record_example(tokenizer: Tokenizer, parts: tuple, seqlen: int) -> tuple:
    """(inputs, targets) of one record, the prompt's targets IGNORE, cut to seqlen + 1 tokens."""
    system, prompt, response = parts
    if tokenizer.chat_template is not None:
        prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(prompt, system), add_bos=False)
    else:
        prompt_ids = tokenizer.encode(prompt if system is None else f"{system}\n\n{prompt}")
    response_ids = tokenizer.encode(response, add_bos=False) + tokenizer.eos_ids[:1]
    ids = np.asarray(prompt_ids + response_ids, dtype=np.int64)[:seqlen + 1]  # [n + 1]
    targets = ids[1:].copy()  # [n]
    targets[:len(prompt_ids) - 1] = IGNORE  # the prompt is context only
    return ids[:-1], targets


def jsonl_examples(tokenizer: Tokenizer, path: Path, text: str, seqlen: int) -> list:
    """One example per record; records whose response starts beyond seqlen are left out."""
    examples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"--data {path}, line {number}: not valid JSON ({err.msg}); one record per line")
        inputs, targets = record_example(tokenizer, record_parts(record, f"--data {path}, line {number}"), seqlen)
        if (targets != IGNORE).any():
            examples.append((inputs, targets))
    return examples


def load_dataset(path: str | Path, tokenizer: Tokenizer, seqlen: int, batch: int, seed: int) -> Dataset:
    """The training set in `path` (text, or JSONL by its suffix); UserError if it yields nothing to train on."""
    path = Path(path)
    text = read_text(path)
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    examples = jsonl_examples(tokenizer, path, text, seqlen) if jsonl else text_examples(tokenizer, text, seqlen)
    if not examples:
        why = "every response starts beyond --seqlen" if jsonl else "the text is shorter than two tokens"
        raise UserError(f"--data {path} gives nothing to train on: {why}")
    return Dataset(examples, batch, seed)
