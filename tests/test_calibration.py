"""The layer-by-layer calibration driver (pipeline/calibration.py) on the real stories260K checkpoint.

stories260K has no tokenizer, so the driver gets random token ids with a fixed
seed. The references are NumPy: H = 2/n X Xᵀ computed from the inputs a plain
wrapper saw, and a model saved by an uninterrupted run, byte for byte.
"""
import dataclasses
import json

import numpy as np
import pytest

import rtn
from conftest import STORIES260K
from model import Config, Model
from pipeline import calibration
from pipeline.calibration import TRUE_SEQUENTIAL, HessianRecorder, calibrate, sample_windows
from runtime.checkpoints.checkpoint import load_checkpoint
from runtime.errors import UserError
from runtime.checkpoints.packed_checkpoint import save_packed
from pipeline.quantize_model import calibrated_method, projection_names
from pipeline.tags import parse_tag

NSAMPLES, SEQLEN = 4, 48


@pytest.fixture(scope="module")
def stories():
    if not STORIES260K.is_file():
        pytest.skip(f"{STORIES260K} not found")
    hf, tensors = load_checkpoint(STORIES260K)
    config = Config.from_hf(hf)
    windows = sample_windows(np.random.default_rng(0).integers(0, config.vocab_size, 2000), NSAMPLES, SEQLEN, 0)
    return config, tensors, windows


def crude_method(calls):
    """2-bit per-row RTN (a large change, so orders matter), recording the call order and each H."""
    def method(names, weights, H):
        calls.append((names, H.copy()))
        return [(rtn.quantize(W, rtn.RTNParams(2, 0)), {}) for W in weights]
    return method


def test_sample_windows_are_random_slices():
    tokens = np.arange(1000) * 7
    windows = sample_windows(tokens, 16, 50, seed=3)
    assert windows.shape == (16, 50)
    starts = windows[:, 0] // 7
    np.testing.assert_array_equal(windows, tokens[starts[:, None] + np.arange(50)])
    np.testing.assert_array_equal(windows, sample_windows(tokens, 16, 50, seed=3))
    assert not np.array_equal(windows, sample_windows(tokens, 16, 50, seed=4))
    with pytest.raises(UserError, match="--seqlen"):
        sample_windows(tokens[:50], 4, 50, seed=0)


@pytest.mark.parametrize("add_rows", [20, 2048])  # 20: rows gathered, folded when full and when too many
def test_hessian_recorder_is_two_over_n_x_xt(add_rows, monkeypatch):
    monkeypatch.setattr(calibration, "ADD_ROWS", add_rows)
    monkeypatch.setattr(calibration, "HESSIAN_BLOCK", 10)  # three column blocks of the lower triangle
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((m, 24)).astype(np.float32) for m in (5, 17, 1, 40, 3)]
    recorder = HessianRecorder(24)
    for j, x in enumerate(batches):
        recorder.add(x)
        if j not in (2, 4):  # read after rows 5, 17, 1 (gathered, not all folded) and at the end
            continue
        X = np.concatenate(batches[:j + 1]).astype(np.float64)  # [n, in]
        H = 2 / len(X) * X.T @ X  # [in, in]
        assert recorder.H.dtype == np.float32  # summed in float32 (as GPTQ's reference) and handed on so
        np.testing.assert_allclose(recorder.H, H, rtol=1e-5, atol=1e-6 * np.abs(H).max())


def test_end_to_end_gptq_on_stories260k(stories, tmp_path):
    config, tensors, windows = stories
    lines = []
    packed, stats = calibrate(config, tensors, calibrated_method(parse_tag("gptq4g32act")), windows,
                              tmp_path / "state", {"tag": "gptq4g32act"}, progress=False, report=lines.append)
    names = projection_names(config)
    assert sorted(packed) == sorted(names) and len(lines) == len(names)
    assert all(s["loss"] < s["rtn_loss"] for s in stats.values())
    # on its calibration data the GPTQ model's logits are closer to the float model's than RTN's
    rtn_packed = {n: rtn.quantize(tensors[n], rtn.RTNParams(4, 32)) for n in names}
    logits = {key: [Model(config, {**tensors, **weights}).prefill(w, Model(config, tensors).new_cache(SEQLEN),
                                                                  all_logits=True) for w in windows]
              for key, weights in (("float", {}), ("gptq", packed), ("rtn", rtn_packed))}  # [T, vocab] each
    error = {key: np.mean((np.array(logits[key]) - np.array(logits["float"])) ** 2) for key in ("gptq", "rtn")}
    assert np.isfinite(error["gptq"]) and error["gptq"] < error["rtn"]


def o_proj_hessian(stories, layer: dict) -> np.ndarray:
    """H [in, in] of layer 0's o_proj input over the windows, with `layer`'s weights in place of the float ones."""
    config, tensors, windows = stories
    seen = []

    class Spy:
        def __init__(self, weight):
            self.weight = weight

        def matmul(self, x):
            seen.append(np.asarray(x, np.float64).reshape(-1, x.shape[-1]))
            return x @ self.weight.T

    model = Model(config, tensors)
    weights = dict(model.layers[0], **layer)
    weights["self_attn.o_proj.weight"] = Spy(weights["self_attn.o_proj.weight"])
    for w in windows:
        model.block(weights, model.embed_tokens(w, 0), model.new_cache(SEQLEN), 0)
    X = np.concatenate(seen)  # [n, in]
    return 2 / len(X) * X.T @ X


def test_true_sequential_order(stories, tmp_path):
    config, tensors, windows = stories
    calls = []
    packed, _ = calibrate(config, tensors, crude_method(calls), windows, tmp_path / "state", {}, progress=False)
    groups = [[f"model.layers.{i}.{p}.weight" for p in group]
              for i in range(config.n_layers) for half in TRUE_SEQUENTIAL["llama"] for group in half]
    assert [names for names, _ in calls] == groups
    # o_proj of layer 0 saw the outputs of the quantized q, k, v, not of the float ones
    quantized = {f"self_attn.{p}_proj.weight": packed[f"model.layers.0.self_attn.{p}_proj.weight"].dequantize()
                 for p in "qkv"}
    H = o_proj_hessian(stories, quantized)  # [in, in]
    np.testing.assert_allclose(calls[1][1], H, rtol=1e-5, atol=1e-6 * np.abs(H).max())  # float32 sums
    assert not np.allclose(calls[1][1], o_proj_hessian(stories, {}), rtol=1e-3)


def test_a_method_can_hand_on_the_weight_later_passes_run(stories, tmp_path):
    # a third item of a method's result replaces the dequantized tensor in the passes that follow
    config, tensors, windows = stories
    calls = []

    def method(names, weights, H):
        calls.append((names, H.copy()))
        return [(rtn.quantize(W, rtn.RTNParams(2, 0)), {}, 0.5 * np.asarray(W)) for W in weights]

    calibrate(config, tensors, method, windows, tmp_path / "state", {}, progress=False)
    halved = {f"self_attn.{p}_proj.weight": 0.5 * np.asarray(tensors[f"model.layers.0.self_attn.{p}_proj.weight"])
              for p in "qkv"}
    H = o_proj_hessian(stories, halved)  # [in, in]
    np.testing.assert_allclose(calls[1][1], H, rtol=1e-5, atol=1e-6 * np.abs(H).max())


def test_interrupted_run_resumes_bit_identical(stories, tmp_path):
    config, tensors, windows = stories
    method = calibrated_method(parse_tag("gptq3g32"))
    settings = {"tag": "gptq3g32"}
    full, full_stats = calibrate(config, tensors, method, windows, tmp_path / "full", settings, progress=False)

    def crash_after_layer_2(i):
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(config, tensors, method, windows, tmp_path / "cut", settings, progress=False,
                  after_layer=crash_after_layer_2)
    calls = []
    counting = lambda names, weights, H: calls.append(names) or method(names, weights, H)
    resumed, resumed_stats = calibrate(config, tensors, counting, windows, tmp_path / "cut", settings,
                                       resume=True, progress=False)
    assert {n.split(".")[2] for names in calls for n in names} == {"3", "4"}  # layers 0-2 came from disk
    assert resumed_stats == full_stats
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    save_packed(tmp_path / "a", {}, full)
    save_packed(tmp_path / "b", {}, resumed)
    saved = [(tmp_path / d / "model.safetensors").read_bytes() for d in "ab"]
    assert saved[0] == saved[1]


def test_resume_refuses_other_settings(stories, tmp_path):
    config, tensors, windows = stories
    small = dataclasses.replace(config, n_layers=1)
    one_layer = {k: v for k, v in tensors.items() if ".layers." not in k or ".layers.0." in k}
    calibrate(small, one_layer, crude_method([]), windows, tmp_path / "state", {"tag": "a"}, progress=False)
    assert json.loads((tmp_path / "state" / "settings.json").read_text())["tag"] == "a"
    with pytest.raises(UserError, match="different settings"):
        calibrate(small, one_layer, crude_method([]), windows, tmp_path / "state", {"tag": "b"},
                  resume=True, progress=False)
    with pytest.raises(UserError, match="windows_sha256"):
        calibrate(small, one_layer, crude_method([]), windows[:, :40], tmp_path / "state", {"tag": "a"},
                  resume=True, progress=False)


def test_opt_fc2_hessian_matches_transformers(tmp_path):
    """OPT's order [q, k, v], [out_proj], [fc1], [fc2]; fc2's H of layer 0 from HF's own forward pass."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_model = transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96, vocab_size=120,
        max_position_embeddings=64, init_std=0.2)).eval()
    hf_model.save_pretrained(tmp_path / "opt")
    hf_config, tensors = load_checkpoint(tmp_path / "opt")
    config = Config.from_hf(hf_config)
    windows = sample_windows(np.random.default_rng(0).integers(0, 120, 500), 3, 24, 0)
    calls = []
    packed, _ = calibrate(config, tensors, crude_method(calls), windows, tmp_path / "state", {}, progress=False)
    prefix = "model.decoder.layers"
    assert [names for names, _ in calls] == [[f"{prefix}.{i}.{p}.weight" for p in group] for i in range(2)
                                             for half in TRUE_SEQUENTIAL["opt"] for group in half]
    layer = hf_model.model.decoder.layers[0]
    inputs = []
    layer.fc2.register_forward_hook(lambda module, args, output: inputs.append(args[0].reshape(-1, 96).double().numpy()))
    with torch.no_grad():
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1"):
            module = layer.get_submodule(p)
            module.weight.copy_(torch.from_numpy(packed[f"{prefix}.0.{p}.weight"].dequantize()))
        for w in windows:
            hf_model(torch.tensor(w)[None])
    X = np.concatenate(inputs)  # [n, ffn]
    np.testing.assert_allclose(calls[3][1], 2 / len(X) * X.T @ X, rtol=1e-4, atol=1e-6)


def test_each_finished_layer_releases_its_float_weights(stories, tmp_path, monkeypatch):
    """After a layer is quantized and saved, its float arrays go back to the OS (release_pages), layer by layer,
    and the result is the same as without releasing."""
    from pipeline import calibration

    config, tensors, windows = stories
    reference, _ = calibrate(config, tensors, crude_method([]), windows, tmp_path / "a", {}, progress=False)
    released = []
    monkeypatch.setattr(calibration, "release_pages", lambda a: released.append(a.shape))
    packed, _ = calibrate(config, tensors, crude_method([]), windows, tmp_path / "b", {}, progress=False)
    layer_arrays = sum(len(Model(config, tensors).layers[i]) for i in range(config.n_layers))
    assert len(released) == layer_arrays
    for name in reference:
        np.testing.assert_array_equal(packed[name].dequantize(), reference[name].dequantize())
