"""The whole forward pass on CuPy arrays (`--device cuda`) against the NumPy pass; skipped without a GPU.

Two kinds of models: the real stories260K checkpoint quantized by the methods
themselves, and random-weight Llama / OPT models with every packed format
(codes drawn at random in each format's range by bench_models.py; the CPU and
GPU kernels must agree whatever the codes are).
"""
import numpy as np
import pytest

import bench_models
from conftest import STORIES260K
from model import Config, Model
from runtime import cuda_graph_step
from runtime.checkpoints.checkpoint import load_checkpoint

pytestmark = pytest.mark.gpu

TOLERANCE = 1e-3  # of the largest |logit|: float32 sums in another order, int8 ties rounded alike
EVERY_FORMAT = ("rtn2g64", "rtn3g128", "rtn4g128", "rtn4g128sym", "rtn8", "gptq4g128act", "gptq3g64act", "nf4",
                "nf4dq", "fp4", "int8", "int8t10", "absmax8", "smooth8", "spqr2", "spqr3", "spqr4g32s16",
                "spqr3dense", "quip2", "quip3", "quip4", "quipsharp2", "quipsharp3", "quipsharp4")


def small(arch: str) -> dict:
    """A config.json of a small model of `arch` whose sizes every format takes (multiples of 128)."""
    if arch == "opt":
        return dict(bench_models.hf_config("opt-1.3b"), hidden_size=256, ffn_dim=512, num_hidden_layers=2,
                    num_attention_heads=4, vocab_size=512, word_embed_proj_dim=256, max_position_embeddings=64)
    return dict(bench_models.hf_config("tinyllama-1.1b"), hidden_size=256, intermediate_size=512,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                max_position_embeddings=64)


@pytest.fixture(autouse=True)
def float_activations(monkeypatch):
    """The CPU reference multiplies float activations, as the GPU kernels do (by default the CPU quantizes a
    decode row's activations to int8: QLLM_ACTIVATIONS)."""
    monkeypatch.setenv("QLLM_ACTIVATIONS", "float")


def assert_same_logits(cfg: Config, tensors: dict, cupy, ids, tolerance: float = TOLERANCE):
    """Prefill (every position's logits) and greedy decode steps agree between NumPy and CuPy."""
    cpu, gpu = Model(cfg, tensors), Model(cfg, tensors, cupy)
    a = cpu.prefill(ids[:6], cpu.new_cache(16), all_logits=True)  # [6, vocab]
    b = gpu.prefill(ids[:6], gpu.new_cache(16), all_logits=True).get()  # [6, vocab]
    scale = np.abs(a).max()
    assert np.abs(a - b).max() < tolerance * scale
    cache_a, cache_b = cpu.new_cache(16), gpu.new_cache(16)
    cpu.prefill(ids[:6], cache_a)
    gpu.prefill(ids[:6], cache_b)
    for token in ids[6:]:
        assert np.abs(cpu.decode(token, cache_a) - gpu.decode(token, cache_b).get()).max() < tolerance * scale
    if cuda_graph_step.takes(gpu):  # a Llama decodes through its CUDA graph, not the op-by-op fallback
        assert gpu._graph_step.graph


@pytest.mark.parametrize("tag", [None, "rtn4g128", "int8"])  # nf4 needs in % 64 == 0; stories260K has 172
def test_cuda_forward_matches_cpu(cupy, tag):
    from pipeline.quantize_model import quantize_tensors
    from pipeline.tags import parse_tag
    config, tensors = load_checkpoint(STORIES260K)
    cfg = Config.from_hf(config)
    if tag:
        spec = parse_tag(tag)
        spec.group_size = 32 if tag.startswith("rtn") else spec.group_size  # stories260K: 64 inputs per row
        tensors = quantize_tensors(cfg, tensors, spec, progress=False)
    assert_same_logits(cfg, tensors, cupy, [1, 403, 407, 261, 378, 401, 300, 12])


@pytest.mark.parametrize("tag", EVERY_FORMAT)
def test_every_format_forward_matches_cpu(cupy, tag):
    hf = small("llama")
    assert_same_logits(Config.from_hf(hf), bench_models.packed_tensors(hf, tag, seed=3), cupy,
                       [1, 40, 407, 261, 378, 401, 300, 12])


@pytest.mark.parametrize("tag", [None, "rtn4g128", "nf4dq", "int8", "quipsharp2"])
def test_opt_forward_matches_cpu(cupy, tag):
    hf = small("opt")
    tensors = bench_models.float_tensors(hf, seed=4) if tag is None else bench_models.packed_tensors(hf, tag, seed=4)
    assert_same_logits(Config.from_hf(hf), tensors, cupy, [2, 40, 407, 261, 378, 401, 300, 12])


def test_float16_weights_on_the_gpu_match_float32_on_the_cpu(cupy):
    hf = small("llama")
    tensors = bench_models.float_tensors(hf, seed=5)
    half = {name: w.astype(np.float16) if w.ndim == 2 else w for name, w in tensors.items()}
    cfg = Config.from_hf(hf)
    ids = [1, 40, 407, 261, 378, 401]
    a = Model(cfg, tensors).prefill(ids, Model(cfg, tensors).new_cache(16), all_logits=True)  # [6, vocab]
    gpu = Model(cfg, half, cupy)
    b = gpu.prefill(ids, gpu.new_cache(16), all_logits=True).get()  # [6, vocab]
    assert np.abs(a - b).max() < 2e-2 * np.abs(a).max()  # float16 weights and activations: ~3 decimal digits


@pytest.mark.parametrize("tag", [None, "rtn4g128"])
def test_graph_step_over_a_long_cache_and_a_second_cache(cupy, tag):
    """The graph step attends over more positions than a block has threads (300 > 256), replays at every
    position, and is captured again for another cache; each step's logits match the CPU's and the op-by-op
    GPU step's."""
    hf = dict(small("llama"), max_position_embeddings=512)
    cfg = Config.from_hf(hf)
    tensors = bench_models.float_tensors(hf, seed=6) if tag is None else bench_models.packed_tensors(hf, tag, seed=6)
    cpu, gpu, eager = Model(cfg, tensors), Model(cfg, tensors, cupy), Model(cfg, tensors, cupy, cuda_graph=False)
    ids = np.random.default_rng(7).integers(3, cfg.vocab_size, 306).tolist()
    caches = [(m, m.new_cache(320)) for m in (cpu, gpu, eager)]
    for m, cache in caches:
        m.prefill(ids[:300], cache)
    other, cpu_other = gpu.new_cache(320), cpu.new_cache(320)  # a second cache: decoding into it captures again
    gpu.prefill(ids[:2], other)
    cpu.prefill(ids[:2], cpu_other)
    for token in ids[300:]:
        a, b, c = (m.decode(token, cache) for m, cache in caches)
        b, c = b.get(), c.get()
        scale = np.abs(a).max()
        assert np.abs(a - b).max() < TOLERANCE * scale
        assert np.abs(b - c).max() < 1e-4 * scale  # the same products; norms and attention summed in another order
        first = gpu._graph_step
        a2, b2 = cpu.decode(token, cpu_other), gpu.decode(token, other).get()
        assert gpu._graph_step is not first and gpu._graph_step.graph
        assert np.abs(a2 - b2).max() < TOLERANCE * np.abs(a2).max()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_float_gemv_matches_numpy(cupy, dtype):
    """The graph step's product for float weights: 16-byte loads where rows allow (1024 inputs), one weight at a
    time where they do not (1001), against NumPy in float64."""
    from runtime.kernels import float_gemv_cuda

    rng = np.random.default_rng(8)
    for n_out, n_in in [(300, 1024), (37, 1001)]:
        w = rng.standard_normal((n_out, n_in)).astype(dtype)  # [out, in]
        x = rng.standard_normal(n_in).astype(np.float32)  # [in]
        y = float_gemv_cuda.gemv(cupy.asarray(x), cupy.asarray(w)).get()  # [out]
        ref = w.astype(np.float64) @ x.astype(np.float64)  # [out]
        assert y.dtype == np.float32 and np.linalg.norm(y - ref) <= 1e-5 * np.linalg.norm(ref)
