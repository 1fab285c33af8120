"""Layer-by-layer calibration: collect each linear's input Hessian and quantize the model one layer at a time.

The driver of every method that needs data (GPTQ, Frantar et al. 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", §5 setup, and its reference code IST-DASLab/gptq: `get_wikitext2`,
`llama_sequential` / `opt_sequential`, `GPTQ.add_batch`):

1. Samples: `nsamples` windows of `seqlen` consecutive tokens of the
   calibration text, each starting at an offset drawn uniformly with `seed`.
2. Embeddings once: hidden [nsamples, seqlen, d].
3. For each half of each decoder layer (attention, then MLP: `Model.halves`),
   for each "true-sequential" group of the half's linears (Llama: [q, k, v],
   [o] | [gate, up], [down]; OPT: [q, k, v], [out_proj] | [fc1], [fc2]): run
   the samples through the half with the group's weights replaced by recorders
   that accumulate H = 2/n · Σ x xᵀ (summed in float32) of their input and
   stop the pass there, quantize the group's linears with H, and put the
   quantized weights in place, so the next group sees the inputs the quantized
   model will give it. The linears of one group read the same input, so they
   share one H. The products of the half's earlier groups are kept from the
   pass that first computes them (`RememberedProduct`).
4. Run the samples through the fully quantized half: the attention half's
   outputs are the MLP half's inputs, the MLP half's the next layer's. The
   reference reruns the whole layer from its input for each group; starting the
   MLP half from the attention half's outputs gives the same inputs with fewer
   products (with the remembered ones, per OPT token and layer 12 d²
   multiply-adds instead of 27 when each pass stops at its group, and the
   attention twice instead of four times). Memory stays at one layer's
   activations.

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
from runtime.linear import linear
from runtime.checkpoints.packed_checkpoint import load_packed, save_packed
from runtime.checkpoints.safetensors_io import read_safetensors, release_pages, write_safetensors

TRUE_SEQUENTIAL = {  # arch -> the groups of each half of a layer (model.Model.halves): attention, MLP
    "llama": ((("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",)),
              (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))),
    "opt": ((("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",)),
            (("fc1",), ("fc2",))),
}
HESSIAN_BLOCK = 1024  # columns of Σ x xᵀ per product of HessianRecorder._fold
ADD_ROWS = 2048  # input rows HessianRecorder gathers before it folds them in
SETTINGS_FILE = "settings.json"
HIDDEN_FILE = "hidden.safetensors"
# what a state directory holds: the settings, the hidden states, one directory per finished layer, and
# temporaries of those (runtime/checkpoints/atomic.py)
STATE_ENTRY = re.compile(r"\.?(settings\.json|hidden\.safetensors|layer_\d{4})(\..+\.(tmp|old))?")
NO_SPACE_HINT = "free some space on that disk, then continue with quantize.py --resume (the finished layers are kept)"

# method(names, [W [out_k, in]], H [in, in]) -> [(packed tensor, {stat name: float})]: one group's linears;
# a third item, when given, is the float weight [out_k, in] later passes run in place of the packed tensor's
# dequantized value (pipeline/training/compensation.py: the base plus its initial adapter)
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
    """Raised by a group's recorder once it has the group's input: the rest of the half is not needed."""


@dataclass
class SampleCursor:
    """The calibration sample a half is running on now (the key of RememberedProduct's outputs)."""
    sample: int = 0


class HessianRecorder:
    """Running H = 2/n · Σ x xᵀ [in, in] over n input rows (GPTQ's add_batch), summed in float32 as the
    reference implementation does (half the time of float64); `H` hands it on in float32, and each method
    takes it to the precision of its own math (layerwise.py: GPTQ and SpQR factor it in float32 as the GPTQ
    reference, QuIP and QuIP# in float64). Only the lower triangle is summed, by column blocks of
    HESSIAN_BLOCK (half the multiply-adds of x xᵀ), and mirrored once when H is read: with 8 windows of 512
    through two OPT-1.3b-wide layers, `add` took 10.2 -> 5.0 s on 2 cores (cProfile of quantize.py). Rows
    are gathered ADD_ROWS at a time before they are folded in: one window of 512 rows at a time, fc2's
    [8192, 8192] sums ran at 122 GFLOP/s, four windows at a time at 161."""

    def __init__(self, n_in: int):
        self.sum = np.zeros((n_in, n_in), dtype=np.float32)  # [in, in] Σ x xᵀ, lower triangle
        self.rows = None  # [ADD_ROWS, in] rows not yet folded in (allocated by the first add)
        self.filled = 0  # how many of them hold rows
        self.n = 0

    @property
    def H(self) -> np.ndarray:
        """H [in, in] float32 of the rows so far (a new array)."""
        self._fold_gathered()
        n_in = self.sum.shape[0]
        for i0 in range(0, n_in, HESSIAN_BLOCK):  # the upper triangle from the lower, block by block
            i1 = min(i0 + HESSIAN_BLOCK, n_in)
            self.sum[i0:i1, i1:] = self.sum[i1:, i0:i1].T
        return self.sum * np.float32(2 / max(self.n, 1))

    def add(self, x: np.ndarray) -> None:
        """Take the rows of x [..., in] into H."""
        n_in = self.sum.shape[0]
        rows = np.asarray(x, dtype=np.float32).reshape(-1, n_in)  # [m, in]
        self.n += len(rows)
        if self.filled + len(rows) > ADD_ROWS:
            self._fold_gathered()
        if len(rows) >= ADD_ROWS:
            return self._fold(np.ascontiguousarray(rows))
        if self.rows is None:
            self.rows = np.empty((ADD_ROWS, n_in), dtype=np.float32)  # [ADD_ROWS, in]
        self.rows[self.filled:self.filled + len(rows)] = rows
        self.filled += len(rows)

    def _fold_gathered(self) -> None:
        if self.filled:
            self._fold(self.rows[:self.filled])
            self.filled = 0

    def _fold(self, rows: np.ndarray) -> None:
        """Σ x xᵀ += rowsᵀ rows [m, in], lower triangle."""
        n_in = self.sum.shape[0]
        for i0 in range(0, n_in, HESSIAN_BLOCK):  # column block i0:i1 of Σ x xᵀ, its rows i0 and below
            i1 = min(i0 + HESSIAN_BLOCK, n_in)
            self.sum[i0:, i0:i1] += rows[:, i0:].T @ rows[:, i0:i1]  # [in - i0, i1 - i0]


class RecordingWeight:
    """Stands in for a float weight [out, in] of the group being calibrated: adds its input x to the group's
    Hessian and stops the pass (the group's linears share that input, so whichever comes first records it
    for all of them, and nothing after it in the half is needed)."""

    def __init__(self, recorder: HessianRecorder):
        self.recorder = recorder

    def matmul(self, x):
        self.recorder.add(x)
        raise _StopForward


class RememberedProduct:
    """Stands in for a quantized weight [out, in] of a group calibrated earlier in the same half: its inputs
    do not change from pass to pass (only later groups do), so x Wᵀ [..., out] is computed on the first pass
    after the group's quantization, kept per sample (a copy: `linear` adds the bias into what it gets), and
    handed out again on the passes after that (per OPT layer: q/k/v and fc1 once instead of twice, 7 d²
    multiply-adds per token; memory: those outputs for the samples, fc1's 536 MB at 32 x 512)."""

    def __init__(self, weight: np.ndarray, cursor: SampleCursor):
        self.weight, self.cursor = weight, cursor
        self.outputs = {}  # sample -> x Wᵀ [seqlen, out]

    def matmul(self, x):
        y = self.outputs.get(self.cursor.sample)
        if y is None:
            y = self.outputs[self.cursor.sample] = linear(x, self.weight)  # [seqlen, out]
        return y.copy()


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


def _run_half(model: Model, half: int, weights: dict, hidden: np.ndarray, i: int, bar, cursor: SampleCursor,
              out: np.ndarray | None = None):
    """Every sample through half `half` (0 attention, 1 MLP) of layer i with `weights`; outputs into `out`
    (None: a recording pass)."""
    cache = model.new_cache(hidden.shape[1])  # its length stays 0: each sample starts at position 0
    attention_half, mlp_half = model.halves
    for s in range(hidden.shape[0]):
        cursor.sample = s
        try:
            y = (attention_half(weights, hidden[s], cache, i) if half == 0
                 else mlp_half(weights, hidden[s]))  # [seqlen, d]
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
    halves = TRUE_SEQUENTIAL[config.arch]
    passes = sum(len(groups) + 1 for groups in halves)
    outputs = np.empty_like(hidden)  # [nsamples, seqlen, d]
    for i in range(done, config.n_layers):
        weights = dict(model.layers[i])
        layer_packed = {}
        with tqdm(total=len(hidden) * passes, desc=f"layer {i + 1}/{config.n_layers}",
                  unit="pass", disable=not progress, leave=False) as bar:
            for half, groups in enumerate(halves):
                cursor = SampleCursor()
                running = dict(weights)  # the half's weights as its passes see them
                for group in groups:
                    recorder = HessianRecorder(weights[f"{group[0]}.weight"].shape[1])
                    recording = {f"{p}.weight": RecordingWeight(recorder) for p in group}
                    _run_half(model, half, {**running, **recording}, hidden, i, bar, cursor)
                    names = [f"{prefix}.{i}.{p}.weight" for p in group]
                    results = method(names, [np.asarray(weights[f"{p}.weight"]) for p in group], recorder.H)
                    for p, name, (tensor, linear_stats, *seen) in zip(group, names, results):
                        layer_packed[name], stats[name] = tensor, linear_stats
                        weights[f"{p}.weight"] = seen[0] if seen else tensor.dequantize()  # [out, in] float32
                        running[f"{p}.weight"] = (weights[f"{p}.weight"] if group is groups[-1]
                                                  else RememberedProduct(weights[f"{p}.weight"], cursor))
                        if report:
                            report(f"{name}: " + ", ".join(f"{k} {v:.5g}" for k, v in stats[name].items()))
                _run_half(model, half, running, hidden, i, bar, cursor, outputs)
                hidden, outputs = outputs, hidden  # [nsamples, seqlen, d] the half's outputs
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
