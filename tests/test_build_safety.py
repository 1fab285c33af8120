"""Building a model races no other build, survives kill -9 and a full disk, and leaves nothing behind.

Subprocesses build BASE.TAG models of a tiny random Llama (conftest.save_tiny_llama)
on first use (`find_or_build`, as `run.py --model BASE.TAG` does) in a models
directory of their own (QLLM_MODELS_DIR). tests/fault_hooks/sitecustomize.py
kills them (SIGKILL), fills their disk (ENOSPC) or slows them down at a chosen
write. The reference of every build is an uninterrupted build of the same model
in the same place: the same bytes.
"""
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TWO_LAYER_LLAMA, save_tiny_llama
from runtime.checkpoints import atomic
from runtime.checkpoints.atomic import DiskFull, atomic_directory, atomic_file, remove_temporaries, temporary_name
from pipeline.calibration import CalibrationSettings
from pipeline.quantize_model import BUILD_FILES, build_quantized
from pipeline.tags import parse_tag

HOOKS = Path(__file__).resolve().parent / "fault_hooks"
# find_or_build NAME, after waiting for the file GO when given; prints the sha256 of the weights it loads
BUILD = """import hashlib, os, sys, time
from pathlib import Path
from runtime.checkpoints.packed_checkpoint import load_packed
from pipeline.first_use import find_or_build
if len(sys.argv) > 2:
    Path(sys.argv[2] + f".ready{os.getpid()}").touch()
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.01)
path = find_or_build(sys.argv[1])
load_packed(path)
print(hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest())
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with two layers, rows of 64 and 128 weights and a context of 512 (GPTQ's default)."""
    path = tmp_path_factory.mktemp("base") / "tiny"
    save_tiny_llama(path, **TWO_LAYER_LLAMA, intermediate_size=128, max_position_embeddings=512)
    return path


@pytest.fixture
def models(tiny, tmp_path):
    """A models directory holding only the tiny base."""
    shutil.copytree(tiny, tmp_path / "models" / "tiny")
    return tmp_path / "models"


def environment(models: Path, fault: str | None = None) -> dict:
    env = dict(os.environ, QLLM_MODELS_DIR=str(models), PYTHONPATH=str(HOOKS))
    env.pop("QLLM_FAULT", None)
    return env if fault is None else dict(env, QLLM_FAULT=fault)


def build(models: Path, name: str, fault: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BUILD, name], cwd=ROOT, env=environment(models, fault),
                          capture_output=True, text=True, timeout=600)


def snapshot(model_dir: Path) -> dict:
    """The bytes of a built model, config.json without the time and memory the build took."""
    files = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    config = json.loads(files.pop("config.json"))
    for key in ("seconds", "peak_rss_mb"):
        del config["quantization"][key]
    return {**files, "config.json": config}


def leftovers(models: Path, name: str) -> list[str]:
    """Whatever `models` holds besides the base, the model `name` (with only the files a build writes)
    and its lock file."""
    found = sorted(p.name for p in models.iterdir() if p.name not in {"tiny", name, f".{name}.lock"})
    if (models / name).is_dir():
        found += sorted(f"{name}/{p.name}" for p in (models / name).iterdir() if p.name not in BUILD_FILES)
    return found


def temporaries(root: Path) -> list[Path]:
    """The temporaries of runtime/checkpoints/atomic.py anywhere under `root`."""
    return [p for p in root.rglob("*") if p.name.endswith((".tmp", ".old"))]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """{tag: (models directory, snapshot of an uninterrupted first-use build of tiny.TAG in it)}, built once."""
    built = {}

    def get(tag):
        if tag not in built:
            models = tmp_path_factory.mktemp("reference") / "models"
            shutil.copytree(tiny, models / "tiny")
            result = build(models, f"tiny.{tag}")
            assert result.returncode == 0, result.stderr
            built[tag] = models, snapshot(models / f"tiny.{tag}")
        return built[tag]
    return get


def test_concurrent_first_use_builds_build_once_and_load_the_same_bytes(models):
    go = models.parent / "go"
    fault = r"fsync:model\.safetensors:sleep"  # the builder takes 3 s: the others surely find it building
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, "tiny.rtn8", str(go)], cwd=ROOT,
                              env=environment(models, fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(5)]
    deadline = time.monotonic() + 300
    while len(list(models.parent.glob("go.ready*"))) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0] * 5, [err for _, _, err in results]
    hashes = {out.strip() for _, out, _ in results}
    assert len(hashes) == 1
    builders = [err for _, _, err in results if "quantizing rtn8" in err]
    assert len(builders) == 1
    waiters = [err for _, _, err in results if "waiting for another process building" in err]
    assert len(waiters) >= 1 and all("was built by another process meanwhile" in err for err in waiters)
    assert all("Traceback" not in err for _, _, err in results)
    assert leftovers(models, "tiny.rtn8") == []


@pytest.mark.parametrize("tag,fault", [
    ("rtn8", r"fsync:model\.safetensors"),    # the weights half written in the temporary directory
    ("rtn8", r"replace:tiny\.rtn8$"),          # the temporary directory complete, not yet renamed into place
    ("gptq4", r"fsync:hidden\.safetensors"),   # calibration: layer 0 saved, its hidden states being written
    ("gptq4", r"replace:layer_0001$"),         # calibration: layer 1's state directory about to be renamed
])
def test_kill_during_first_use_build_then_rebuild_leaves_no_leftovers(reference, tag, fault):
    models, expected = reference(tag)
    name = f"tiny.{tag}"
    shutil.rmtree(models / name)
    killed = build(models, name, f"{fault}:kill")
    assert killed.returncode == -9, killed.stderr
    assert not (models / name).exists() and leftovers(models, name)  # the kill left its temporaries
    rebuilt = build(models, name)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert leftovers(models, name) == []
    assert snapshot(models / name) == expected


def test_kill_while_replacing_a_model_then_rebuild(reference):
    """Killed between renaming the old model aside and the new one into place: the next build cleans up."""
    models, expected = reference("rtn8")
    quantize = [sys.executable, "quantize.py", "--model", str(models / "tiny"), "--method", "rtn", "--bits", "8",
                "--out", str(models / "tiny.rtn8"), "--overwrite"]
    killed = subprocess.run(quantize, cwd=ROOT, env=environment(models, r"replace:tiny\.rtn8$:kill"),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    assert any(p.name.endswith(".old") for p in models.iterdir())
    rebuilt = build(models, "tiny.rtn8")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert leftovers(models, "tiny.rtn8") == []
    assert snapshot(models / "tiny.rtn8") == expected


def test_resume_after_kill_keeps_the_saved_layers_and_removes_the_rest(tiny, tmp_path):
    def quantize(out, fault=None, *extra):
        return subprocess.run([sys.executable, "quantize.py", "--model", str(tiny), "--method", "gptq", "--bits", "4",
                               "--nsamples", "4", "--seqlen", "32", "--out", str(out), *extra], cwd=ROOT,
                              env=environment(tmp_path, fault), capture_output=True, text=True, timeout=600)

    assert quantize(tmp_path / "reference" / "tiny.gptq4").returncode == 0
    out = tmp_path / "run" / "tiny.gptq4"
    killed = quantize(out, r"replace:layer_0001$:kill")  # layer 0 and its hidden states saved
    assert killed.returncode == -9, killed.stderr
    assert temporaries(out.with_name("tiny.gptq4.partial"))  # layer 1's half-saved state directory
    resumed = quantize(out, r"replace:layer_0000$:kill", "--resume")  # killed if it did layer 0 again
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == [".tiny.gptq4.lock", "tiny.gptq4"]
    assert snapshot(out) == snapshot(tmp_path / "reference" / "tiny.gptq4")


def test_only_temporaries_of_gone_owners_are_removed(tmp_path):
    target = tmp_path / "model"
    mine = temporary_name(target, "tmp")
    mine.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = Path(str(mine).replace(f"~{os.getpid()}~", f"~{gone.stdout.strip()}~"))
    reused = Path(str(mine).replace(f"~{os.getpid()}~{mine.name.split('~')[2].split('.')[0]}.",
                                    f"~{os.getpid()}~12345."))  # this pid, another start time: pid reused
    other_target = temporary_name(tmp_path / "model.rtn8", "tmp")
    for path in (dead, reused, other_target):
        path.mkdir()
    (tmp_path / ".model.lock").touch()
    remove_temporaries(tmp_path, "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other_target.name, ".model.lock"])
    remove_temporaries(tmp_path, "model", any_owner=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other_target.name, ".model.lock"])


def no_space_on(monkeypatch, pattern: str) -> None:
    """Make os.fsync of a file whose path holds `pattern` fail as a full disk does."""
    fsync = os.fsync

    def full(fd):
        if pattern in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(fd)
    monkeypatch.setattr(atomic.os, "fsync", full)


def test_full_disk_in_a_file_names_it_and_removes_the_temporary(tmp_path):
    with pytest.raises(DiskFull, match=f"no space left on the device to write {tmp_path / 'state.json'}: free"):
        with atomic_file(tmp_path / "state.json") as f:
            f.write(b"{}")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_in_a_directory_names_the_final_path(tmp_path, monkeypatch):
    no_space_on(monkeypatch, "weights.bin")
    with pytest.raises(DiskFull) as caught:
        with atomic_directory(tmp_path / "model") as tmp:
            with atomic_file(tmp / "weights.bin") as f:
                f.write(b"x" * 100)
    assert str(caught.value) == (f"no space left on the device to write {tmp_path / 'model' / 'weights.bin'}: "
                                 f"free some space on that disk and run again")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_saving_calibration_state(tiny, tmp_path, monkeypatch):
    no_space_on(monkeypatch, "hidden.safetensors")
    out = tmp_path / "tiny.gptq4"
    with pytest.raises(DiskFull, match=r"write .*tiny\.gptq4\.partial/hidden\.safetensors: .*--resume"):
        build_quantized(tiny, parse_tag("gptq4"), out, progress=False,
                        calibration=CalibrationSettings(nsamples=2, seqlen=16))
    assert not out.exists() and temporaries(tmp_path) == []


def test_full_disk_while_saving_perplexity_state(tmp_path, monkeypatch):
    from pipeline import perplexity
    no_space_on(monkeypatch, "state.json")
    monkeypatch.setattr(perplexity, "token_logprobs", lambda model, window: np.zeros(len(window) - 1))
    with pytest.raises(DiskFull, match=f"write {tmp_path / 'state.json'}: .*--no-resume"):
        perplexity.perplexity(None, list(range(40)), seqlen=10, state_path=tmp_path / "state.json", progress=False)
    assert list(tmp_path.iterdir()) == []
