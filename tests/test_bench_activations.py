"""bench_activations.py's bookkeeping (the perplexities themselves are the benchmark, not a test): one eval.py per
variant and activation setting, the table of changes against float with the 0.3% target marked, and a failed
evaluation or bad option as one line."""
import subprocess
import time

import pytest

import bench_activations
from runtime.errors import UserError


def test_each_variant_is_evaluated_under_every_setting(monkeypatch, tmp_path):
    calls = []
    values = {"float": 20.0, "int8": 20.01, "int8-all": 20.1}
    monkeypatch.setattr(bench_activations, "perplexity",
                        lambda model, mode, windows: calls.append((model, mode, windows)) or values[mode])
    monkeypatch.setattr(bench_activations, "PROJECT", tmp_path)
    (tmp_path / "benchmarks").mkdir()
    bench_activations.main(["--tags", "rtn4g128,quipsharp2", "--windows", "2"])
    assert calls == [(f"smollm2-135m.{tag}", mode, 2) for tag in ("rtn4g128", "quipsharp2")
                     for mode in bench_activations.MODES]
    text = (tmp_path / "benchmarks" / "activations.md").read_text()
    today = time.strftime("%Y-%m-%d")
    assert f"| smollm2-135m.rtn4g128 | 20.0000 | 20.0100 | +0.050% | 20.1000 | +0.500% (over 0.3%) | {today} |" in text
    # a later run of one variant rewrites its row and keeps the others
    values.update({"float": 30.0, "int8": 30.0, "int8-all": 30.0})
    (tmp_path / "benchmarks" / "activations.md").write_text(text.replace(today, "2026-01-02"))
    bench_activations.main(["--tags", "quipsharp2", "--windows", "2"])
    text = (tmp_path / "benchmarks" / "activations.md").read_text()
    assert "| smollm2-135m.rtn4g128 | 20.0000 | 20.0100 | +0.050% | 20.1000 | +0.500% (over 0.3%) | 2026-01-02 |" in text
    assert f"| smollm2-135m.quipsharp2 | 30.0000 | 30.0000 | +0.000% | 30.0000 | +0.000% | {today} |" in text
    assert text.index("rtn4g128") < text.index("quipsharp2")  # rows in TAGS order
    bench_activations.main(["--tags", "quipsharp2", "--windows", "3"])  # another window count: a new table
    assert "rtn4g128" not in (tmp_path / "benchmarks" / "activations.md").read_text()


def test_perplexity_runs_eval_in_a_child_with_the_setting(monkeypatch):
    seen = {}

    def fake_run(command, cwd, env, capture_output, text):
        seen.update(command=command, mode=env["QLLM_ACTIVATIONS"])
        return subprocess.CompletedProcess(command, 0, stdout='progress\n{"ppl": 21.5, "windows": 4}\n', stderr="")
    monkeypatch.setattr(bench_activations.subprocess, "run", fake_run)
    assert bench_activations.perplexity("smollm2-135m.nf4", "int8-all", 4) == 21.5
    assert seen["mode"] == "int8-all"
    assert seen["command"][-5:] == ["--model", "smollm2-135m.nf4", "--windows", "4", "--json"]


def test_a_failed_evaluation_names_the_model_and_setting(monkeypatch):
    monkeypatch.setattr(bench_activations.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(
        command, 1, stdout="", stderr="error: models/x is missing\n"))
    with pytest.raises(RuntimeError, match="smollm2-135m.x under QLLM_ACTIVATIONS=float failed: error: models/x"):
        bench_activations.perplexity("smollm2-135m.x", "float", 4)


@pytest.mark.parametrize("args, message", [(["--windows", "0"], "--windows must be at least 1"),
                                           (["--tags", " , "], "--tags names no variant")])
def test_bad_options_are_one_user_error(args, message):
    with pytest.raises(UserError, match=message):
        bench_activations.main(args)
