"""Quantize every linear layer of a checkpoint with a method and save the packed model.

The driver behind `quantize.py` and behind `run.py --model BASE.TAG` when the
quantized model is not built yet (pipeline/first_use.py imports it only then). Every decoder projection (Llama: q, k, v,
o, gate, up, down; OPT: q, k, v, out_proj, fc1, fc2) goes through the
method. As llama.cpp does for this project's default model (its Q4_1 file
keeps `token_embd` at Q8_0), the LM head is kept at 8 bits (per-row
round-to-nearest) and the token embedding in float16, whatever the method.
Methods whose contract asks for the Hessian (pipeline/tags.py) run through
pipeline/calibration.py, layer by layer, with their state kept in
`<out_dir>.partial/` for `resume`.

Writing never loses a user's files: a build checks everything it needs
before the work starts (`check_output` refuses the base model, the current
directory, the project and their parents, files, and any directory holding
what a build did not write; a model a build wrote is replaced only when asked
to). The model is written under a temporary name beside `out_dir` and swapped
in by renames once complete. Builds into one `out_dir` take turns under a file
lock beside it (`.NAME.lock`), so two processes building the same BASE.TAG on
first use build it once; the lock also proves that the temporaries of
interrupted builds found beside it are leftovers, which are removed.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import filelock
import numpy as np
from tqdm import tqdm

from model import Config
from runtime.checkpoints.atomic import atomic_directory, full_disk_reported, remove_temporaries
from pipeline.calibration import CalibrationSettings, calibrate, check_state_dir, is_state_dir, remove_state, \
    sample_windows, settings_record, state_dir_for, text_tokens
from runtime.checkpoints.checkpoint import load_checkpoint
from runtime.errors import UserError
from runtime.checkpoints.importers import is_quantized_checkpoint, load_quantized_checkpoint
from runtime.lora import load_adapter, merge_lora
from runtime.checkpoints.packed_checkpoint import save_packed
from runtime.checkpoints.safetensors_io import release_pages
from runtime.hub.resolve import MODELS_DIR, PROJECT_ROOT
from pipeline.tags import contracts
from runtime.method_contract import QuantSpec
from runtime.text.tokenizer import Tokenizer

PROJECTIONS = {"llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
               "opt": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "fc1", "fc2")}
HEAD_SPEC = QuantSpec("rtn", 8, 0, {"sym"})
BUILD_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")  # what a build writes


def projection_names(config: Config) -> list[str]:
    """Checkpoint names of every decoder projection weight, layer by layer."""
    prefix = "model.decoder.layers" if config.arch == "opt" else "model.layers"
    return [f"{prefix}.{i}.{p}.weight" for i in range(config.n_layers) for p in PROJECTIONS[config.arch]]


def quantize_weight(weight: np.ndarray, spec: QuantSpec):
    """The packed weight [out, in] of a method that needs no calibration, with the settings of `spec`."""
    contract = contracts()[spec.method]
    return contract.quantize(np.asarray(weight, dtype=np.float32), contract.params(spec))


def calibrated_method(spec: QuantSpec):
    """A method that needs the Hessian, as pipeline/calibration.py calls it: (names, weights, H) -> [(packed, stats)]."""
    contract = contracts()[spec.method]
    params = contract.params(spec)
    return lambda names, weights, hessian: contract.quantize(weights, hessian, params)


def quantize_tensors(config: Config, tensors: dict, spec: QuantSpec, progress: bool = True,
                     projections: dict | None = None) -> dict:
    """The model's tensors with projections packed by the method (or taken from `projections`, already
    packed), head at 8 bits, embedding in float16."""
    names = projection_names(config)
    out = {name: value for name, value in tensors.items() if name not in names}
    if projections is not None:
        out.update(projections)
    else:
        for name in tqdm(names, desc=f"quantizing {spec.tag}", unit="linear", disable=not progress):
            out[name] = quantize_weight(tensors[name], spec)
            release_pages(tensors[name])  # its float pages leave memory: peak RSS ~ the packed model, not the float
    embed_name = "model.decoder.embed_tokens.weight" if config.arch == "opt" else "model.embed_tokens.weight"
    out["lm_head.weight"] = quantize_weight(tensors.get("lm_head.weight", tensors[embed_name]), HEAD_SPEC)
    out[embed_name] = np.asarray(tensors[embed_name], dtype=np.float16)
    return out


def calibration_windows(tokenizer: Tokenizer, calibration: CalibrationSettings) -> np.ndarray:
    """The token windows [nsamples, seqlen] a calibrated method runs on, drawn as `calibration` says."""
    return sample_windows(text_tokens(tokenizer, calibration.text), calibration.nsamples, calibration.seqlen,
                          calibration.seed)


def calibrate_projections(base: Path, config: Config, tensors: dict, spec: QuantSpec, out_dir: Path,
                          calibration: CalibrationSettings, windows: np.ndarray, resume: bool,
                          progress: bool) -> tuple[dict, dict]:
    """(packed projections, summary for config.json) of a calibrated method on the windows [nsamples, seqlen]."""
    record = settings_record(calibration)
    settings = dict(record, tag=spec.tag, base=str(Path(base).resolve()))
    packed, stats = calibrate(config, tensors, calibrated_method(spec), windows, state_dir_for(out_dir),
                              settings, resume, progress, tqdm.write if progress else None)
    return packed, {"calibration": record, "proxy_loss": summarize_stats(stats)}


def summarize_stats(stats: dict) -> dict:
    """The per-linear stats of a calibrated method summed over the model (losses, outlier counts), with the
    mean and max of the per-linear ratio to RTN's loss."""
    keys = sorted({k for s in stats.values() for k in s} - {"ratio", "bits"})
    ratios = [s["ratio"] for s in stats.values()]
    return {**{k: sum(s.get(k, 0) for s in stats.values()) for k in keys}, "ratio_mean": sum(ratios) / len(ratios),
            "ratio_max": max(ratios), "linears": len(ratios)}


def bits_per_weight(config: Config, packed: dict) -> float:
    """Average stored bits per weight of the decoder projections: codes and all side data, from the bytes."""
    weights = [packed[name] for name in projection_names(config)]
    return sum(8 * w.nbytes for w in weights) / sum(int(np.prod(w.shape)) for w in weights)


def smooth(config: Config, tensors: dict, sequences: list) -> tuple[dict, dict]:
    """SmoothQuant's offline step: per-channel activation maxima of the calibration `sequences`, folded
    into the norms and the linears that follow them; (smoothed tensors, summary for config.json)."""
    import int8
    from pipeline import smoothing
    smoothed = smoothing.smooth_model(config, tensors, sequences, int8.SMOOTHQUANT_ALPHA)
    return smoothed, {"smoothing": {"alpha": int8.SMOOTHQUANT_ALPHA, "sequences": len(sequences),
                                    "length": len(sequences[0])}}


def foreign_entries(directory: Path) -> list[str]:
    """What in `directory` no build wrote: every entry, unless its config.json has the quantization record
    of a build, then the entries other than the files a build writes."""
    names = sorted(p.name for p in directory.iterdir())
    try:
        record = json.loads((directory / "config.json").read_text(encoding="utf-8"))["quantization"]
        ours = isinstance(record, dict) and {"method", "tag", "bits_per_weight"} <= record.keys()
    except (OSError, ValueError, KeyError, TypeError):
        ours = False
    return [name for name in names if name not in BUILD_FILES] if ours else names


def check_output(out_dir: Path, base: Path, overwrite: bool) -> None:
    """UserError unless a model may be written to `out_dir`.

    Never: the base model or a folder holding it, the current directory, the project, the models
    directory or a parent of one of them, a symbolic link, an existing file, or a directory holding
    anything a build did not write. A model written by a build is replaced only with `overwrite`;
    an empty directory always may be.
    """
    out_dir = Path(out_dir)
    target, base = out_dir.resolve(), Path(base).resolve()
    if target == base or target in base.parents:
        what = "the base model" if target == base else f"a folder holding the base model {base}"
        raise UserError(f"{out_dir} is {what}: write the quantized model elsewhere (--out)")
    for place, what in ((Path.cwd().resolve(), "the current directory"), (PROJECT_ROOT, "the project"),
                        (MODELS_DIR, "the models directory")):
        if target == place or target in place.parents:
            raise UserError(f"{out_dir} is {what} or one of its parents, which a build never replaces: "
                            f"give a new directory as --out (default: models/BASE.TAG)")
    if out_dir.is_symlink():
        raise UserError(f"{out_dir} is a symbolic link: give the directory it points to as --out")
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{existing} is an existing file: give as --out the path of a directory to create")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write in {existing} (permission denied): choose another --out")
    if existing != target or not any(out_dir.iterdir()):
        return
    foreign = foreign_entries(out_dir)
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UserError(f"{out_dir} holds what quantize.py did not write ({listed}): move it away or choose "
                        f"another --out (--overwrite replaces only a model quantize.py wrote)")
    if not overwrite:
        raise UserError(f"{out_dir} already holds a quantized model: add --overwrite to replace it "
                        f"(the old one stays until the new one is complete)")


def built_as(out_dir: Path, request: dict) -> bool:
    """True when `out_dir` holds a model a build wrote with the quantization record entries of `request`."""
    try:
        record = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))["quantization"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return not foreign_entries(out_dir) and all(record.get(k) == v for k, v in request.items())


@contextlib.contextmanager
def build_lock(out_dir: Path):
    """Hold the lock of builds into `out_dir` (the file .NAME.lock beside it, kept); yields True when
    another process held it first, after saying on stderr that this one waits."""
    lock_path = out_dir.with_name(f".{out_dir.name}.lock")
    with full_disk_reported(lock_path):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(lock_path)
        try:
            lock.acquire(timeout=0)
            waited = False
        except filelock.Timeout:
            print(f"waiting for another process building {out_dir} ...", file=sys.stderr, flush=True)
            lock.acquire()
            waited = True
    try:
        yield waited
    finally:
        lock.release()


def check_shapes(config: Config, tensors: dict, spec: QuantSpec) -> None:
    """UserError, before any work, when `spec`'s group is larger than a row of some projection or the
    method refuses the width of its rows (the method's own checks run on one random row of each width)."""
    widths = {name: tensors[name].shape[1] for name in projection_names(config)}
    name, width = min(widths.items(), key=lambda item: item[1])
    if spec.group_size > width:
        raise UserError(f"group {spec.group_size} of {spec.tag} is larger than a row of the model ({name} has "
                        f"rows of {width} weights): choose a group of at most {width}, or none (one per row)")
    if contracts()[spec.method].calibration != "hessian":
        rows = np.random.default_rng(0).standard_normal((1, max(widths.values())), dtype=np.float32)  # [1, in]
        for width in sorted(set(widths.values())):
            quantize_weight(rows[:, :width], spec)


def remove_leftovers(out_dir: Path) -> None:
    """What interrupted builds of `out_dir` left: its temporaries and those inside its calibration state
    (the state itself is kept for --resume). Called under the build lock, which proves their owners gone."""
    remove_temporaries(out_dir.parent, out_dir.name, any_owner=True)
    state_dir = state_dir_for(out_dir)
    if is_state_dir(state_dir):
        remove_temporaries(state_dir, any_owner=True)


def build_quantized(base: Path, spec: QuantSpec, out_dir: Path, progress: bool = True,
                    calibration: CalibrationSettings | None = None, resume: bool = False,
                    lora: Path | None = None, overwrite: bool = False) -> Path:
    """Quantize the checkpoint at `base` as `spec` says and write it to `out_dir`, atomically.

    Everything the build needs is checked before the work starts: where it writes (`check_output`;
    `overwrite` lets it replace a model a build wrote there), the tokenizer, the calibration text, the
    adapter, and, once the checkpoint is loaded, its projections' shapes. Builds into one `out_dir`
    take turns (`build_lock`); one that waited for another process's build of the same model keeps
    that model. Leftovers of interrupted builds into `out_dir` are removed first. A calibrated
    method draws its data as `calibration` says (default settings when None) and continues a run
    interrupted with the same settings when `resume`. A PEFT adapter directory `lora` is merged
    into the float weights first.
    """
    base, calibration = Path(base), calibration or CalibrationSettings()
    check_output(out_dir, base, overwrite)
    out_dir = Path(os.path.abspath(out_dir))  # "a/.." spelled out, so the names beside it are right
    tokenizer = Tokenizer.load(base)
    windows = sequences = None
    needs = contracts()[spec.method].calibration
    if needs == "hessian":
        check_state_dir(state_dir_for(out_dir))
        windows = calibration_windows(tokenizer, calibration)  # [nsamples, seqlen]
    if needs == "activations":
        from pipeline.smoothing import calibration_sequences
        sequences = calibration_sequences(tokenizer)
    adapter = load_adapter(lora) if lora is not None else None
    request = {"tag": spec.tag, "base": str(base.resolve()), "lora_merged": None if lora is None else str(lora)}
    with build_lock(out_dir) as waited:
        if waited and built_as(out_dir, request):
            print(f"{out_dir} was built by another process meanwhile: using it", file=sys.stderr, flush=True)
            return out_dir
        check_output(out_dir, base, overwrite)
        hf_config, tensors = (load_quantized_checkpoint(base, dequantize=True) if is_quantized_checkpoint(base)
                              else load_checkpoint(base))
        config = Config.from_hf(hf_config)
        check_shapes(config, tensors, spec)
        remove_leftovers(out_dir)
        start = time.perf_counter()
        if adapter is not None:
            tensors = merge_lora(tensors, adapter)
        projections, extra = None, {}
        if sequences is not None:
            tensors, extra = smooth(config, tensors, sequences)
        if windows is not None:
            projections, extra = calibrate_projections(base, config, tensors, spec, out_dir, calibration, windows,
                                                       resume, progress)
        packed = quantize_tensors(config, tensors, spec, progress, projections)
        hf_config = dict(hf_config, quantization={
            "method": spec.method, "bits": spec.bits, "group_size": spec.group_size,
            "options": sorted(spec.options), **({"values": spec.values} if spec.values else {}),
            **{k: v for k, v in request.items() if v is not None},
            "lm_head": HEAD_SPEC.tag, "embed_tokens": "float16",
            "bits_per_weight": round(bits_per_weight(config, packed), 4), **extra,
            "seconds": round(time.perf_counter() - start, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})  # Linux: KiB
        with atomic_directory(out_dir) as tmp:
            save_packed(tmp, hf_config, packed)
            tokenizer.save(tmp)
        remove_state(state_dir_for(out_dir))
    return out_dir
