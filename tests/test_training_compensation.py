"""train.py --init loftq|cloq: adapters that start by cancelling the base's quantization error.

- LoftQ's factors reach the Eckart-Young bound: ‖R − s B A‖² is the sum of R's squared singular values
  beyond the rank (from np.linalg.svd of R, not the factors' own path).
- CLoQ's factors reach the same bound in the norm of the layer's outputs, tr((R − M) H (R − M)ᵀ) with H
  the damped XᵀX = L Lᵀ (R L's singular values: Cholesky, not the code's eigendecomposition), beat
  LoftQ's there, and every small perturbation of them is worse.
- On a tiny Llama quantized to NF4-DQ, both starts bring the logits closer to the float model's, CLoQ's
  the closest; train.py --init cloq trains from there, resumes bit-identically after a kill, and bad
  requests get one-line errors.
"""
import numpy as np
import pytest

from conftest import save_tiny_llama

torch = pytest.importorskip("torch")
pytest.importorskip("peft")  # test_training_cli's

import train  # noqa: E402
from model import Config, Model  # noqa: E402
from pipeline.api import load_model  # noqa: E402
from pipeline.quantize_model import build_quantized  # noqa: E402
from pipeline.tags import parse_tag  # noqa: E402
from pipeline.training.adapter import new_adapter, write_adapter  # noqa: E402
from pipeline.training.compensation import DAMPING, compensate, low_rank_factors, whitening  # noqa: E402
from pipeline.training.data import load_dataset  # noqa: E402
from runtime.checkpoints.checkpoint import load_checkpoint  # noqa: E402
from runtime.errors import UserError  # noqa: E402
from runtime.text.tokenizer import Tokenizer  # noqa: E402
from test_training_cli import TINY, check_resume_after_kill  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 20
ARGS = ["--seqlen", "16", "--batch", "2", "--grad-accum", "2", "--rank", "8", "--alpha", "16", "--lr", "1e-2",
        "--warmup", "1", "--quiet"]


def test_loftq_factors_reach_the_eckart_young_bound():
    rng = np.random.default_rng(0)
    R = rng.standard_normal((24, 40)).astype(np.float32)  # [out, in]
    singular = np.linalg.svd(R.astype(np.float64), compute_uv=False)  # [24]
    A, B = low_rank_factors(R, 5, 2.0)
    assert A.shape == (5, 40) and B.shape == (24, 5) and A.dtype == B.dtype == np.float32
    M = 2.0 * B.astype(np.float64) @ A
    assert np.linalg.matrix_rank(M) == 5
    np.testing.assert_allclose(np.sum((R - M) ** 2), np.sum(singular[5:] ** 2), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), np.linalg.norm(B, axis=0), rtol=1e-5)  # split evenly
    A, B = low_rank_factors(R, 30, 2.0)  # more rank than R has: exact, the spare factors zero
    np.testing.assert_allclose(2.0 * B @ A, R, atol=1e-5)
    assert not A[24:].any() and not B[:, 24:].any()


def test_cloq_factors_minimise_the_output_error():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 32)) * np.geomspace(10, 0.1, 32)  # [n, in] inputs of very unequal scale
    R = rng.standard_normal((20, 32))  # [out, in]
    H = X.T @ X  # [in, in]
    damped = H + DAMPING * np.mean(np.diag(H)) * np.eye(32)

    def output_error(M):
        return float(np.trace((R - M) @ damped @ (R - M).T))  # ‖(R − M) Xᵀ‖² + damp ‖R − M‖²

    A, B = low_rank_factors(R, 4, 0.5, whitening(H))
    cloq = 0.5 * B.astype(np.float64) @ A
    bound = np.sum(np.linalg.svd(R @ np.linalg.cholesky(damped), compute_uv=False)[4:] ** 2)  # R L: R H^½ rotated
    np.testing.assert_allclose(output_error(cloq), bound, rtol=1e-4)
    A_f, B_f = low_rank_factors(R, 4, 0.5)
    assert output_error(cloq) < 0.8 * output_error(0.5 * B_f.astype(np.float64) @ A_f)
    for _ in range(20):  # any nearby rank-4 product is worse
        dA, dB = 1e-2 * rng.standard_normal(A.shape), 1e-2 * rng.standard_normal(B.shape)
        assert output_error(0.5 * (B + dB) @ (A + dA)) > output_error(cloq)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """(float directory, its NF4-DQ build, a text file to train on)."""
    root = tmp_path_factory.mktemp("compensation")
    save_tiny_llama(root / "float", **TINY)
    build_quantized(root / "float", parse_tag("nf4dq"), root / "float.nf4dq", progress=False)
    (root / "data.txt").write_text(TEXT)
    return root / "float", root / "float.nf4dq", root / "data.txt"


def logits_distance(path, adapter_dir, float_logits, ids) -> float:
    model = load_model(path, lora=None if adapter_dir is None else str(adapter_dir))
    return float(np.linalg.norm(model.prefill(ids, model.new_cache(len(ids)), all_logits=True) - float_logits))


def test_compensated_starts_bring_the_quantized_model_towards_the_float_one(bases, tmp_path):
    float_dir, quantized_dir, data = bases
    config, tensors = load_checkpoint(float_dir)
    ids = np.asarray(Tokenizer.load(float_dir).encode(TEXT)[:48])
    float_model = Model(Config.from_hf(config), tensors)
    float_logits = float_model.prefill(ids, float_model.new_cache(len(ids)), all_logits=True)  # [T, vocab]
    quantized = load_model(quantized_dir)
    dataset = load_dataset(data, Tokenizer.load(quantized_dir), 16, 2, 0)
    distances = {"lora": logits_distance(quantized_dir, None, float_logits, ids)}
    for init in ("loftq", "cloq"):
        adapter = new_adapter(quantized, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"], 16, 32.0, np.random.default_rng(0))
        compensate(adapter, quantized, init, float_dir, dataset, 16, progress=False)
        write_adapter(tmp_path / init, adapter, str(quantized_dir), 0.0)
        distances[init] = logits_distance(quantized_dir, tmp_path / init, float_logits, ids)
    assert distances["cloq"] < distances["loftq"] < 0.9 * distances["lora"], distances


def test_train_from_cloq_resumes_bit_identically(bases, tmp_path, monkeypatch):
    _, quantized_dir, data = bases
    common = ["--model", str(quantized_dir), "--data", str(data), "--steps", "3", "--save-every", "1",
              "--init", "cloq", *ARGS]
    check_resume_after_kill(common, tmp_path, monkeypatch, kill_at=5, saved_step=2)  # in step 3
    with pytest.raises(UserError, match="other settings"):  # the start is part of the settings
        train.main([*[a if a != "cloq" else "loftq" for a in common], "--out", str(tmp_path / "resumed"),
                    "--resume"])


def test_bad_requests_are_one_user_error(bases, tmp_path):
    float_dir, quantized_dir, data = bases
    common = ["--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1", *ARGS]
    with pytest.raises(UserError, match="not quantized"):
        train.main(["--model", str(float_dir), "--init", "cloq", "--float-base", str(float_dir), *common])
    with pytest.raises(UserError, match="does not record the float model"):
        train.main(["--model", str(float_dir), "--init", "loftq", *common])
    other = tmp_path / "other"
    save_tiny_llama(other, **dict(TINY, intermediate_size=192))
    with pytest.raises(UserError, match="does not match the base"):
        train.main(["--model", str(quantized_dir), "--init", "loftq", "--float-base", str(other), *common])
    with pytest.raises(UserError, match="--float-base is used by --init loftq or cloq only"):
        train.main(["--model", str(quantized_dir), "--float-base", str(float_dir), *common])
