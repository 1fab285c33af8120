"""eval.py --dataset FILE: any UTF-8 text under the GPTQ protocol, equal to the API's own log-likelihoods;
bad files get one line each."""
import json
import math

import numpy as np
import pytest

from conftest import assert_fails_with, run_script, save_tiny_llama
from pipeline.api import load, token_logprobs

pytest.importorskip("torch")
pytest.importorskip("transformers")

SEQLEN = 16
TEXT = ("Perplexity can be measured on any text: the Penn Treebank, C4, or a user's own notes.\r\n"
        "Each window of tokens is scored on its own; the tail that does not fill one is dropped.\n") * 6


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(path)
    return path


def test_file_perplexity_equals_the_api(tiny_model, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_bytes(TEXT.encode("utf-8"))
    result = run_script("eval.py", "--model", str(tiny_model), "--dataset", str(text_file), "--seqlen", str(SEQLEN),
                 "--json", "--no-resume")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    llm = load(str(tiny_model))
    ids = llm.tokenizer.encode(TEXT.replace("\r\n", "\n"))  # tokenized once, CRLF read as LF
    count = len(ids) // SEQLEN
    nll = -sum(token_logprobs(llm.model, ids[i * SEQLEN:(i + 1) * SEQLEN]).sum() for i in range(count))
    assert out["windows"] == count and out["tokens"] == count * (SEQLEN - 1)
    assert math.isclose(out["ppl"], float(np.exp(nll / (count * (SEQLEN - 1)))), rel_tol=1e-9)
    assert out["dataset"] == str(text_file)


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b" \n\t\r\n", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "is not UTF-8 text"),
    (b"text\x00with NUL bytes", "is binary"),
    (b"too short", "is too short"),
], ids=["missing", "empty", "blank", "not-utf8", "binary", "too-short"])
def test_bad_files_get_one_line(tiny_model, tmp_path, content, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    result = run_script("eval.py", "--model", str(tiny_model), "--dataset", str(path), "--seqlen", str(SEQLEN))
    assert_fails_with(result, message)
    assert str(path) in result.stderr


def test_directory_and_unknown_name(tmp_path):
    assert_fails_with(run_script("eval.py", "--dataset", str(tmp_path)), "is a directory")
    assert_fails_with(run_script("eval.py", "--dataset", "ptb"), "not a data set (wikitext2) and no such file")
