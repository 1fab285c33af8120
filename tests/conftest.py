"""Shared test fixtures: paths of the real data and of the built default model, the CLI helpers, and the
one closeness rule and one input generator of the kernel and format tests."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
SMOLLM2_DIR = ROOT / "models" / "smollm2-135m"
SMOLLM2_GGUF = ROOT / "models" / "smollm2-135m.Q4_1.gguf"
STORIES260K = DATA / "models" / "stories260K" / "stories260K.bin"


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted default model (built by `make install`)."""
    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.skip("models/smollm2-135m not built: run `make install`")
    return SMOLLM2_DIR


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The GGUF file of the default model (fetched by `make install`)."""
    if not SMOLLM2_GGUF.is_file():
        pytest.skip("models/smollm2-135m.Q4_1.gguf not fetched: run `make install`")
    return SMOLLM2_GGUF


TWO_LAYER_LLAMA = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)  # GQA


def save_tiny_llama(path, **overrides):
    """Save a random tiny HF Llama with the real Llama 2 SentencePiece tokenizer to `path`; return the model."""
    import shutil

    import torch
    import transformers

    torch.manual_seed(0)
    config = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=32000, max_position_embeddings=24, bos_token_id=1,
                  eos_token_id=2)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(config, **overrides))).eval()
    model.save_pretrained(path)
    shutil.copy(DATA / "tokenizers" / "llama2" / "tokenizer.model", Path(path) / "tokenizer.model")
    return model


@pytest.fixture(scope="session")
def cupy():
    """The cupy module when a CUDA device is usable; the test is skipped otherwise."""
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except cp.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")
    return cp


def run_script(*args, env=None) -> subprocess.CompletedProcess:
    """Run a Python command line (a script of the project and its arguments) from the project root."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def assert_fails_with(result: subprocess.CompletedProcess, message: str) -> None:
    """A CLI refusal as the README promises it: exit status 1 and one line on stderr holding `message`."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def inputs(seed, *shape, mean=0.0):
    """Seeded float32 activations of `shape` (e.g. rows, n_in): standard normal plus `mean`.

    `seed` is an int or a numpy Generator (then its next draws are taken, as `rng.standard_normal` would).
    A non-zero `mean` (0.5), as after an activation, makes the kernels' folded zero-point terms matter.
    """
    return (np.random.default_rng(seed).standard_normal(shape) + mean).astype(np.float32)


def assert_close(y, ref, tol=1e-5):
    """The kernel-vs-reference rule: same shape, float32, and ||y - ref|| <= tol * ||ref||.

    The default 1e-5 leaves room for float32 sums in another order (kernels fold scales and zeros once
    per group, tile, and reduce in SIMD lanes); callers comparing int8 and float paths pass their own tol.
    """
    assert y.shape == ref.shape and y.dtype == np.float32, (y.shape, ref.shape, y.dtype)
    assert np.linalg.norm(y - ref) <= tol * np.linalg.norm(ref), float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def assert_shared_hessian_equals_separate_calls(method, W, H, params, split: int):
    """`method.quantize_shared` of W's rows [:split] and [split:] under one H gives what `method.quantize`
    gives each alone: the same stats, stored arrays and dequantized weights (GPTQ, SpQR, QuIP, QuIP#).

    BLAS on one thread: the rows never interact in the algorithms, but multithreaded OpenBLAS splits a product
    [out, k] @ [k, n] between its threads by the number of rows, and the rounding of a row's sums then depends
    on `out` (on 2 threads GPTQ's losses came out 4e-8 apart, its codes equal); the check is of the methods,
    and other tests leave the BLAS on a thread per core."""
    with threadpool_limits(1, user_api="blas"):
        shared = method.quantize_shared([W[:split], W[split:]], H, params)
        alone = [method.quantize(W[rows], H, params) for rows in (slice(0, split), slice(split, W.shape[0]))]
    for (packed, stats), (alone, alone_stats) in zip(shared, alone):
        assert stats == alone_stats
        for name, array in alone.tensors().items():
            np.testing.assert_array_equal(packed.tensors()[name], array, err_msg=name)
        np.testing.assert_array_equal(packed.dequantize(), alone.dequantize())


def assert_device_matches_reference(cupy, packed, row_counts=(1, 4)):
    """The packed tensor's CUDA product (a CuPy array) is assert_close to its NumPy reference, for each number of
    input rows in `row_counts` (one: decode; more: batches and prefill) of inputs with a mean of 0.5 (so the folded
    zero-point terms matter)."""
    on_gpu = packed.to_device(cupy)
    for rows in row_counts:
        x = inputs(rows, rows, packed.in_features, mean=0.5)
        y = on_gpu.matmul(cupy.asarray(x))
        assert isinstance(y, cupy.ndarray)
        assert_close(cupy.asnumpy(y), packed.matmul_reference(x))
