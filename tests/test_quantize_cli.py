"""quantize.py as a careless user runs it: where it may write, and one-line errors before any work.

Every refusal must leave what was there untouched (a canary file survives)
and print one line, `error: ...`, with exit status 1 and no traceback. The
base is a tiny random Llama (conftest.save_tiny_llama) with rows of 64 and
128 weights.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, save_tiny_llama

HOOKS = Path(__file__).resolve().parent / "fault_hooks"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny"
    save_tiny_llama(path, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=64)
    return path


def quantize(*args, cwd=ROOT, fault=None, models=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(HOOKS), **({"QLLM_FAULT": fault} if fault else {}),
               **({"QLLM_MODELS_DIR": str(models)} if models else {}))
    return subprocess.run([sys.executable, str(ROOT / "quantize.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def refused(result: subprocess.CompletedProcess, *phrases: str, after_progress: bool = False) -> str:
    """The one-line message of a run that must have failed with exit status 1: all it printed (after the
    progress bars when `after_progress`)."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr and (after_progress or len(lines) == 1), result.stderr
    assert lines[-1].startswith("error: ") and all(p in lines[-1] for p in phrases), result.stderr
    return lines[-1]


def canary(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "canary.txt"
    path.write_text("still here")
    return path


def test_out_into_a_foreign_directory_is_refused_even_with_overwrite(tiny, tmp_path):
    bird = canary(tmp_path / "photos")
    for extra in ([], ["--overwrite"]):
        refused(quantize("--model", tiny, "--method", "rtn", "--bits", "8", "--out", tmp_path / "photos", *extra),
                "did not write (canary.txt)", "choose another --out")
        assert bird.read_text() == "still here"


def test_out_dot_and_parents_of_the_current_directory_are_refused(tiny, tmp_path):
    work = tmp_path / "checkout"
    bird = canary(work)
    (work / "sub").mkdir()
    refused(quantize("--model", tiny, "--method", "rtn", "--bits", "8", "--out", ".", cwd=work),
            "is the current directory or one of its parents")
    refused(quantize("--model", tiny, "--method", "rtn", "--bits", "8", "--out", "..", cwd=work / "sub"),
            "is the current directory or one of its parents")
    assert bird.read_text() == "still here" and (work / "sub").is_dir()


def test_out_the_project_is_refused(tiny, tmp_path):
    refused(quantize("--model", tiny, "--method", "rtn", "--bits", "8", "--out", ROOT, cwd=tmp_path),
            "is the project or one of its parents")
    assert (ROOT / "README.md").is_file() and (ROOT / "quantize.py").is_file()


def test_out_the_models_directory_is_refused_even_when_empty(tiny, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    refused(quantize("--model", tiny, "--method", "rtn", "--bits", "8", "--out", models, models=models),
            "is the models directory")
    assert list(models.iterdir()) == []


def test_out_the_base_model_or_its_folder_is_refused(tiny, tmp_path):
    base = tmp_path / "folder" / "base"
    shutil.copytree(tiny, base)
    bird = canary(base)
    before = sorted(p.name for p in base.iterdir())
    refused(quantize("--model", base, "--method", "rtn", "--bits", "8", "--out", base, "--overwrite"),
            "is the base model")
    refused(quantize("--model", base, "--method", "rtn", "--bits", "8", "--out", base.parent),
            "is a folder holding the base model")
    assert sorted(p.name for p in base.iterdir()) == before and bird.read_text() == "still here"


def test_out_an_existing_file_is_refused(tiny, tmp_path):
    bird = canary(tmp_path)
    refused(quantize("--model", tiny, "--method", "rtn", "--bits", "8", "--out", bird), "is an existing file")
    assert bird.read_text() == "still here"


def test_overwrite_replaces_only_a_model_quantize_wrote(tiny, tmp_path):
    out = tmp_path / "tiny.q"
    assert quantize("--model", tiny, "--method", "rtn", "--bits", "8", "--out", out).returncode == 0
    first = (out / "model.safetensors").read_bytes()
    refused(quantize("--model", tiny, "--method", "rtn", "--bits", "4", "--out", out), "add --overwrite")
    assert (out / "model.safetensors").read_bytes() == first

    result = quantize("--model", tiny, "--method", "rtn", "--bits", "4", "--out", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["quantization"]["tag"] == "rtn4"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny.q.lock", "tiny.q"]  # the old copy is gone

    notes = out / "notes.txt"
    notes.write_text("mine")
    refused(quantize("--model", tiny, "--method", "rtn", "--bits", "8", "--out", out, "--overwrite"),
            "did not write (notes.txt)")
    assert notes.read_text() == "mine"


def test_an_empty_directory_is_filled(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    result = quantize("--model", tiny, "--method", "rtn", "--bits", "8", "--out", tmp_path / "empty")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "empty" / "config.json").is_file()


def test_a_foreign_calibration_state_directory_is_refused(tiny, tmp_path):
    bird = canary(tmp_path / "tiny.gptq.partial")
    refused(quantize("--model", tiny, "--method", "gptq", "--bits", "4", "--out", tmp_path / "tiny.gptq"),
            "where the calibration state goes")
    assert bird.read_text() == "still here"


@pytest.mark.parametrize("args,phrases", [
    (["--method", "gptq", "--bits", "4", "--calib", "{tmp}"], ["calibration text", "is a directory"]),
    (["--method", "gptq", "--bits", "4", "--calib", "{tmp}/missing.txt"], ["calibration text", "does not exist"]),
    (["--method", "spqr", "--bits", "3", "--outlier-threshold", "nan"], ["--outlier-threshold nan", "finite"]),
    (["--method", "spqr", "--bits", "3", "--outlier-threshold", "inf"], ["--outlier-threshold inf", "finite"]),
    (["--method", "rtn", "--bits", "4", "--group", "4096"], ["group 4096", "larger than a row", "rows of 64"]),
    (["--method", "gptq", "--bits", "4", "--group", "256"], ["group 256", "larger than a row"]),
    (["--method", "nf", "--bits", "4", "--group", "48"], ["not a multiple of block_size 48"]),
])
def test_bad_options_get_one_line_before_any_work(tiny, tmp_path, args, phrases):
    out = tmp_path / "out"
    result = quantize("--model", tiny, *[a.format(tmp=tmp_path) for a in args], "--out", out)
    refused(result, *phrases)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_a_checkpoint_without_tokenizer_fails_before_quantizing(tiny, tmp_path):
    base = tmp_path / "untokenized"
    shutil.copytree(tiny, base)
    (base / "tokenizer.model").unlink()
    result = quantize("--model", base, "--method", "rtn", "--bits", "8", "--out", tmp_path / "out")
    refused(result, "no tokenizer found")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.lock").exists()  # refused before the lock


def test_full_disk_while_saving_the_model_is_one_line_and_leaves_nothing(tiny, tmp_path):
    out = tmp_path / "tiny.rtn8"
    result = quantize("--model", tiny, "--method", "rtn", "--bits", "8", "--out", out,
                      fault=r"fsync:model\.safetensors:enospc")
    refused(result, f"no space left on the device to write {out / 'model.safetensors'}: free some space",
            after_progress=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny.rtn8.lock"]
