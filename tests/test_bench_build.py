"""bench_build.py's bookkeeping (the measurements themselves are the benchmark, not a test): every finished row is
saved at once and a rerun for the same model and windows measures only the rows not saved yet."""
import json

import pytest

import bench_build


def test_rerun_measures_only_missing_rows(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(bench_build, "measure", lambda command, env: measured.append(command) or
                        {"seconds": float(len(measured)), "rss": 100.0})
    saved = tmp_path / "rows.json"
    model = tmp_path / "model"
    first = bench_build.run_all(model, 8, ["rtn4g128"], tmp_path, saved, {}, "cmd 8")["8"]["results"]
    assert list(first) == ["floor-io", "floor-calibration", "rtn4g128"] and len(measured) == 3
    assert json.loads(saved.read_text())["runs"]["8"]["results"] == first
    second = bench_build.run_all(model, 8, ["rtn4g128", "gptq4g128"], tmp_path, saved, {}, "cmd 8")["8"]["results"]
    assert len(measured) == 4 and "--nsamples" in measured[-1] and second["rtn4g128"] == first["rtn4g128"]
    runs = bench_build.run_all(model, 32, ["gptq4g128"], tmp_path, saved, {}, "cmd 32")  # other windows: all again
    assert len(measured) == 7 and sorted(runs) == ["32", "8"]  # ... kept beside the 8-window run
    assert runs["8"]["results"] == second and runs["32"]["command"] == "cmd 32"
    other = bench_build.run_all(tmp_path / "other", 8, ["rtn4g128"], tmp_path, saved, {}, "cmd")  # another model
    assert len(measured) == 10 and sorted(other) == ["8"]


def test_again_measures_saved_rows_in_their_place(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(bench_build, "measure", lambda command, env: measured.append(command) or
                        {"seconds": float(len(measured)), "rss": 100.0})
    saved, model = tmp_path / "rows.json", tmp_path / "model"
    first = bench_build.run_all(model, 8, ["rtn4g128", "gptq4g128"], tmp_path, saved, {}, "cmd")["8"]["results"]
    first = {row: dict(m) for row, m in first.items()}
    again = bench_build.run_all(model, 8, ["rtn4g128", "gptq4g128"], tmp_path, saved, {}, "cmd",
                                again=("floor-calibration", "gptq4g128"))["8"]["results"]
    assert len(measured) == 6 and list(again) == list(first)  # two measured again, the order kept
    assert again["floor-calibration"]["seconds"] == 5.0 and again["gptq4g128"]["seconds"] == 6.0
    assert again["rtn4g128"] == first["rtn4g128"] and again["floor-io"] == first["floor-io"]
    assert json.loads(saved.read_text())["runs"]["8"]["results"] == again


def test_again_must_name_a_measured_row(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="--again int8: name rows of --rows or floor-io, floor-calibration"):
        bench_build.main(["--model", str(tmp_path), "--rows", "rtn4g128", "--again", "int8"])


def test_document_ratios_to_the_right_floor(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * (2 << 20))  # 2 MB
    results = {"floor-io": {"seconds": 10.0, "rss": 3.0}, "floor-calibration": {"seconds": 100.0, "rss": 2.0},
               "rtn4g128": {"seconds": 15.0, "rss": 2.5}, "gptq4g128": {"seconds": 250.0, "rss": 2.5}}
    more = dict(results, **{"floor-calibration": {"seconds": 400.0, "rss": 2.0}})
    text = bench_build.document(model, {"32": {"command": "run 32", "results": more},
                                        "8": {"command": "run 8", "results": results}})
    assert "| rtn4g128 | 15 | 1.50 | 2 | 1.25 |" in text
    assert "| gptq4g128 | 250 | 2.50 | 2 | 1.25 |" in text and "| gptq4g128 | 250 | 0.62 | 2 | 1.25 |" in text
    assert text.index("### 8 calibration windows") < text.index("`run 8`") < text.index("### 32 calibration")


def test_measure_survives_a_child_that_writes_much_to_stderr():
    """Progress bars can fill a pipe nobody reads while the child runs: measure must not stall on them, and a
    failing child's stderr ends up in the error."""
    import os
    import sys

    loud = bench_build.measure([sys.executable, "-c", "import sys; sys.stderr.write('x' * (1 << 20))"],
                               dict(os.environ))
    assert loud["seconds"] > 0 and loud["rss"] > 0
    with pytest.raises(SystemExit, match="boom"):
        bench_build.measure([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"],
                            dict(os.environ))
