"""Layer-by-layer calibration: collect each linear's input Hessian and quantize the model one layer at a time.

The driver of every method that needs data (GPTQ, Frantar et al. 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", §5 setup, and its reference code IST-DASLab/gptq: `get_wikitext2`,
`llama_sequential` / `opt_sequential`, `GPTQ.add_batch`):

1. Samples: `nsamples` windows of `seqlen` consecutive tokens of the
   calibration text, each starting at an offset drawn uniformly with `seed`.
2. Embeddings once: hidden [nsamples, seqlen, d].
3. For each decoder layer, for each "true-sequential" group of its linears
   (Llama: [q, k, v], [o], [gate, up], [down]; OPT: [q, k, v], [out_proj],
   [fc1], [fc2]): run the samples through the layer with the group's weights
   replaced by recorders that accumulate H = 2/n · Σ x xᵀ (summed in float32) of their
   inputs, quantize the group's linears with H, and put the quantized weights
   in place, so the next group sees the inputs the quantized model will give it.
   The linears of one group read the same input, so they share one H.
4. Run the samples through the fully quantized layer: its outputs are the next
   layer's inputs. Memory stays at one layer's activations.

After each layer the state is saved atomically to a directory (the finished
layers' packed tensors, the hidden states, the settings), so an interrupted
run continues with `resume=True` and gives a bit-identical model. Only a
directory holding nothing but such a state is ever removed (`remove_state`);
running out of disk space while saving it is one line naming the file, and
the layers saved before stay resumable.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from model import Config, Model
from runtime.checkpoints.atomic import atomic_directory, full_disk_reported, write_text
from runtime.text.datasets import CALIBRATION_TEXT, read_text
from runtime.errors import UserError
from runtime.checkpoints.packed_checkpoint import load_packed, save_packed
from runtime.checkpoints.safetensors_io import read_safetensors, release_pages, write_safetensors

TRUE_SEQUENTIAL = {
    "llama": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    "opt": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
            ("fc1",), ("fc2",)),
}
HESSIAN_BLOCK = 1024  # columns of Σ x xᵀ per product of HessianRecorder.add
SETTINGS_FILE = "settings.json"
HIDDEN_FILE = "hidden.safetensors"
# what a state directory holds: the settings, the hidden states, one directory per finished layer, and
# temporaries of those (runtime/checkpoints/atomic.py)
STATE_ENTRY = re.compile(r"\.?(settings\.json|hidden\.safetensors|layer_\d{4})(\..+\.(tmp|old))?")
NO_SPACE_HINT = "free some space on that disk, then continue with quantize.py --resume (the finished layers are kept)"

# method(names, [W [out_k, in]], H [in, in]) -> [(packed tensor, {stat name: float})]: one group's linears
GroupMethod = Callable[[list, list, np.ndarray], list]


@dataclass
class CalibrationSettings:
    """Which text, and how many windows of how many tokens drawn with which seed."""
    text: Path = CALIBRATION_TEXT
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0


def text_tokens(tokenizer, text_path: Path) -> np.ndarray:
    """Token ids [n] of a calibration text file (no BOS); the default one comes from the Hub when
    ../shared is missing (runtime/text/datasets.py)."""
    text = read_text(text_path, "calibration text", "give a UTF-8 text file with --calib FILE")
    return np.asarray(tokenizer.encode(text, add_bos=False), dtype=np.int64)


def sample_windows(tokens: np.ndarray, nsamples: int, seqlen: int, seed: int) -> np.ndarray:
    """[nsamples, seqlen] windows of `tokens` at random start offsets (GPTQ's get_wikitext2)."""
    tokens = np.asarray(tokens, dtype=np.int64)  # [n]
    if nsamples < 1 or seqlen < 1:
        raise UserError(f"calibration needs nsamples >= 1 and seqlen >= 1, got {nsamples} and {seqlen}")
    if len(tokens) <= seqlen:
        raise UserError(f"the calibration text has {len(tokens)} tokens, fewer than seqlen+1 = {seqlen + 1}: "
                        f"give a longer text (--calib) or a smaller --seqlen")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - seqlen, size=nsamples)  # [nsamples]
    return np.stack([tokens[s:s + seqlen] for s in starts])  # [nsamples, seqlen]


class _StopForward(Exception):
    """Raised by the last recorder of a group: the rest of the layer is not needed for this pass."""


class HessianRecorder:
    """Running H = 2/n · Σ x xᵀ [in, in] over n input rows (GPTQ's add_batch), summed in float32 as the
    reference implementation does (half the time of float64); `H` hands it on in float32, and each method
    takes it to the precision of its own math (layerwise.py: GPTQ and SpQR factor it in float32 as the GPTQ
    reference, QuIP and QuIP# in float64). Only the lower triangle is summed, by column blocks of
    HESSIAN_BLOCK (half the multiply-adds of x xᵀ), and mirrored once when H is read: with 8 windows of 512
    through two OPT-1.3b-wide layers, `add` took 10.2 -> 5.0 s on 2 cores (cProfile of quantize.py)."""

    def __init__(self, n_in: int):
        self.sum = np.zeros((n_in, n_in), dtype=np.float32)  # [in, in] Σ x xᵀ, lower triangle
        self.n = 0
        self.last = None  # the input seen last, so linears sharing it add it once

    @property
    def H(self) -> np.ndarray:
        """H [in, in] float32 of the rows so far (a new array)."""
        n_in = self.sum.shape[0]
        for i0 in range(0, n_in, HESSIAN_BLOCK):  # the upper triangle from the lower, block by block
            i1 = min(i0 + HESSIAN_BLOCK, n_in)
            self.sum[i0:i1, i1:] = self.sum[i1:, i0:i1].T
        return self.sum * np.float32(2 / max(self.n, 1))

    def add(self, x: np.ndarray) -> None:
        """Fold the rows of x [..., in] into H."""
        if x is self.last:
            return
        self.last = x
        n_in = self.sum.shape[0]
        rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, n_in)  # [m, in]
        self.n += len(rows)
        for i0 in range(0, n_in, HESSIAN_BLOCK):  # column block i0:i1 of Σ x xᵀ, its rows i0 and below
            i1 = min(i0 + HESSIAN_BLOCK, n_in)
            self.sum[i0:, i0:i1] += rows[:, i0:].T @ rows[:, i0:i1]  # [in - i0, i1 - i0]


class RecordingWeight:
    """Stands in for a float weight [out, in] in the forward pass: multiplies like it and records x."""

    def __init__(self, weight: np.ndarray, recorder: HessianRecorder, stop: bool):
        self.weight, self.recorder, self.stop = weight, recorder, stop

    def matmul(self, x):
        """y [..., out] = x [..., in] @ weight.T, after adding x to the Hessian."""
        self.recorder.add(x)
        if self.stop:
            raise _StopForward
        return x @ self.weight.T


def _settings_json(settings: dict) -> str:
    return json.dumps(settings, indent=2, sort_keys=True)


def _start_state(state_dir: Path, settings: dict, resume: bool) -> bool:
    """Prepare `state_dir` for a run with `settings`; True when a saved state is to be resumed."""
    saved = state_dir / SETTINGS_FILE
    if resume and saved.is_file():
        old = json.loads(saved.read_text())
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            raise UserError(f"cannot resume {state_dir}: it was started with different settings "
                            f"({', '.join(f'{k}: {old.get(k)!r} now {settings.get(k)!r}' for k in changed)}); "
                            f"rerun with the old settings or without --resume to start over")
        return (state_dir / HIDDEN_FILE).is_file()
    check_state_dir(state_dir)
    remove_state(state_dir)
    with full_disk_reported(state_dir):
        state_dir.mkdir(parents=True)
        write_text(saved, _settings_json(settings))
    return False


def is_state_dir(path: Path) -> bool:
    """True when `path` is a directory holding nothing but a calibration state (an empty one counts)."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and all(STATE_ENTRY.fullmatch(p.name) for p in path.iterdir())


def check_state_dir(state_dir: Path) -> None:
    """UserError when something other than a calibration state is where one is to be kept."""
    state_dir = Path(state_dir)
    if (state_dir.exists() or state_dir.is_symlink()) and not is_state_dir(state_dir):
        raise UserError(f"{state_dir} is where the calibration state goes, but it holds something else: "
                        f"move it away (it is never deleted) or choose another --out")


def remove_state(state_dir: Path) -> None:
    """Remove the calibration state at `state_dir`, if one is there; anything else there is left alone."""
    if is_state_dir(state_dir):
        shutil.rmtree(state_dir)


def _layer_dir(state_dir: Path, i: int) -> Path:
    return state_dir / f"layer_{i:04d}"


def _save_layer(state_dir: Path, i: int, packed: dict, hidden: np.ndarray, stats: dict) -> None:
    """Layer i's packed tensors, then the hidden states after it with the stats so far (each atomic)."""
    with full_disk_reported(state_dir, NO_SPACE_HINT):
        with atomic_directory(_layer_dir(state_dir, i)) as tmp:
            save_packed(tmp, {"layer": i}, packed)
        write_safetensors(state_dir / HIDDEN_FILE, {"hidden": hidden},
                          {"layers_done": str(i + 1), "stats": json.dumps(stats)})


def _load_state(state_dir: Path) -> tuple[int, np.ndarray, dict, dict]:
    """(layers done, hidden [nsamples, seqlen, d], packed tensors of the done layers, stats so far)."""
    arrays, meta = read_safetensors(state_dir / HIDDEN_FILE)
    done = int(meta["layers_done"])
    packed = {}
    for i in range(done):
        packed.update(load_packed(_layer_dir(state_dir, i))[1])
    return done, np.array(arrays["hidden"]), packed, json.loads(meta["stats"])


def _run_layer(model: Model, weights: dict, hidden: np.ndarray, i: int, bar, out: np.ndarray | None = None):
    """Every sample through layer i with `weights`; outputs into `out` (None: a recording pass)."""
    cache = model.new_cache(hidden.shape[1])  # its length stays 0: each sample starts at position 0
    for s in range(hidden.shape[0]):
        try:
            y = model.block(weights, hidden[s], cache, i)  # [seqlen, d]
            if out is not None:
                out[s] = y
        except _StopForward:
            pass
        bar.update(1)


def calibrate(config: Config, tensors: dict, method: GroupMethod, windows: np.ndarray,
              state_dir: Path, settings: dict, resume: bool = False, progress: bool = True,
              report: Callable[[str], None] | None = None, after_layer: Callable[[int], None] | None = None
              ) -> tuple[dict, dict]:
    """Quantize every decoder linear of the model layer by layer on the token windows [nsamples, seqlen].

    `method(names, weights, H)` quantizes the linears of one group. `settings` (JSON-able)
    identify the run: a state saved in `state_dir` is resumed (`resume`) only when they and
    the windows are the same. `report` receives one line per linear; `after_layer(i)` is
    called once layer i's state is saved.
    Returns ({checkpoint name: packed tensor}, {checkpoint name: method stats}).
    """
    windows = np.asarray(windows, dtype=np.int64)  # [nsamples, seqlen]
    if windows.ndim != 2 or windows.shape[1] > config.max_positions:
        raise UserError(f"calibration windows must be [nsamples, seqlen] with seqlen <= the model's context "
                        f"{config.max_positions}, got shape {list(windows.shape)}: lower --seqlen")
    settings = dict(settings, nsamples=int(windows.shape[0]), seqlen=int(windows.shape[1]),
                    windows_sha256=hashlib.sha256(windows.tobytes()).hexdigest())
    model = Model(config, tensors)
    prefix = "model.decoder.layers" if config.arch == "opt" else "model.layers"
    if _start_state(Path(state_dir), settings, resume):
        done, hidden, packed, stats = _load_state(Path(state_dir))
    else:
        done, packed, stats = 0, {}, {}
        hidden = np.stack([model.embed_tokens(w, 0) for w in windows])  # [nsamples, seqlen, d]
    groups = TRUE_SEQUENTIAL[config.arch]
    outputs = np.empty_like(hidden)  # [nsamples, seqlen, d]
    for i in range(done, config.n_layers):
        weights = dict(model.layers[i])
        layer_packed = {}
        with tqdm(total=len(hidden) * (len(groups) + 1), desc=f"layer {i + 1}/{config.n_layers}",
                  unit="pass", disable=not progress, leave=False) as bar:
            for group in groups:
                recorder = HessianRecorder(weights[f"{group[0]}.weight"].shape[1])
                recording = {f"{p}.weight": RecordingWeight(weights[f"{p}.weight"], recorder, p == group[-1])
                             for p in group}
                _run_layer(model, {**weights, **recording}, hidden, i, bar)
                names = [f"{prefix}.{i}.{p}.weight" for p in group]
                results = method(names, [np.asarray(weights[f"{p}.weight"]) for p in group], recorder.H)
                for p, name, (tensor, linear_stats) in zip(group, names, results):
                    layer_packed[name], stats[name] = tensor, linear_stats
                    weights[f"{p}.weight"] = tensor.dequantize()  # [out, in] float32
                    if report:
                        report(f"{name}: " + ", ".join(f"{k} {v:.5g}" for k, v in stats[name].items()))
            _run_layer(model, weights, hidden, i, bar, outputs)
        hidden, outputs = outputs, hidden
        packed.update(layer_packed)
        _save_layer(Path(state_dir), i, layer_packed, hidden, stats)
        for tensor in model.layers[i].values():
            release_pages(tensor)  # the layer's float pages leave memory: peak RSS ~ one layer, not the model
        if after_layer:
            after_layer(i)
    return packed, stats


def state_dir_for(out_dir: Path) -> Path:
    """Where the calibration state of a model being built into `out_dir` is kept: `<out_dir>.partial/`."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".partial")


def settings_record(settings: CalibrationSettings) -> dict:
    """The calibration settings as JSON-able values, for config.json and the saved state."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}
