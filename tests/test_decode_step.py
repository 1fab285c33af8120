"""The fused CPU decode step (Model.fused_decode) against the unfused forward pass with the same kernels.

Fused: q/k/v (and Llama's gate/up) in one product each (`linear_many`; the
kernels chosen once, `one_row_products`), and the norms (RMSNorm, OPT's LayerNorm pre-LN and post-LN), RoPE, attention with
the cache write and SiLU·up as Numba kernels (runtime/kernels/decode_step_numba.py). Unfused: one product per projection
and the NumPy elementwise code. Both run the same weights, float or packed
(RTN 4-bit), through prefill and several decode steps:
max |difference| <= TOL * max |logit|.

Packed models are compared with float activations (QLLM_ACTIVATIONS=float),
and on the oracle models with integer activations too, within INT_TOL: the
last-bit difference between the Numba and NumPy norms flips the rounding of
some activations (steps of a block's max / 32639 with two bytes, / 127 with
one), which on the oracle models moves the logits by up to 1e-4 of max
|logit| (measured) and on SmolLM2, whose activations have outliers of several
hundred, by 1-3% with one-byte activations. That is the noise of the
activation quantization, which tests/test_uniform_int8_kernels.py pins down
kernel by kernel and the perplexity check bounds.

Where every layer product is one prepared kernel call (each packed format,
on random codes), the Llama or OPT step runs all its layers in one Numba call
(runtime/kernels/decode_layers_numba.py), biases included:
the same kernels as the Python loop, so the logits must agree to 1e-6 of max
|logit| and the KV cache exactly; elsewhere (a float weight, float
activations) it must keep the Python loop.
"""
import numpy as np
import pytest

import rtn
from model import Config, Model
from runtime.checkpoints.checkpoint import load_checkpoint
from test_model_oracle import CASES, build_hf

TOL = 1e-4
INT_TOL = 1e-3  # with integer activations: the rounding flips above
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2")


def packed(tensors: dict, group_size: int) -> dict:
    """Every decoder linear RTN-quantized to 4 bits with groups of `group_size` (the rest as it is)."""
    params = rtn.RTNParams(bits=4, group_size=group_size)
    return {name: rtn.quantize(np.asarray(t), params) if ".layers." in name and name.endswith(".weight")
            and name.split(".")[-2] in LINEARS else t for name, t in tensors.items()}


def assert_decode_steps_match(config: Config, tensors: dict, prompt, steps, tol=TOL):
    fused, unfused = Model(config, tensors), Model(config, tensors, fused_decode=False)
    assert fused.fused_decode and not unfused.fused_decode and fused.decode_step != fused.unfused_decode_step
    caches = fused.new_cache(len(prompt) + len(steps)), unfused.new_cache(len(prompt) + len(steps))
    fused.prefill(prompt, caches[0])
    unfused.prefill(prompt, caches[1])
    for token in steps:
        a, b = fused.decode(int(token), caches[0]), unfused.decode(int(token), caches[1])  # [vocab] each
        assert a.dtype == np.float32 and np.abs(b).max() > 0
        assert np.abs(a - b).max() <= tol * np.abs(b).max()
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):  # the step wrote the same cache
        assert np.abs(a - b).max() <= tol * np.abs(b).max()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("quantized", [False, True])
def test_oracle_configs(case, quantized, tmp_path, monkeypatch):
    build_hf(*CASES[case]).save_pretrained(tmp_path)
    hf_config, tensors = load_checkpoint(tmp_path)
    tensors = packed(tensors, 32) if quantized else tensors
    ids = np.random.default_rng(2).integers(0, 120, 14)
    if quantized:  # the kernels' integer activations, then float ones for the 1e-4 check
        assert_decode_steps_match(Config.from_hf(hf_config), tensors, ids[:8], ids[8:], INT_TOL)
        monkeypatch.setenv("QLLM_ACTIVATIONS", "float")
    assert_decode_steps_match(Config.from_hf(hf_config), tensors, ids[:8], ids[8:])


def test_the_step_follows_a_new_activation_mode_and_a_swapped_weight(tmp_path, monkeypatch):
    # the fused step chooses each product's kernel once (Model.llama_one_row_products): a later change of
    # QLLM_ACTIVATIONS, or of a weight in the model, must reach the next step
    from runtime.kernels import uniform_int8_numba
    build_hf(*CASES["llama-attention-bias"]).save_pretrained(tmp_path)
    hf_config, tensors = load_checkpoint(tmp_path)
    tensors = packed(tensors, 32)
    fused, unfused = Model(Config.from_hf(hf_config), tensors), Model(Config.from_hf(hf_config), tensors,
                                                                      fused_decode=False)
    caches = fused.new_cache(8), unfused.new_cache(8)
    for model, cache in zip((fused, unfused), caches):
        model.prefill([3, 17, 29], cache)
    calls, run = [], uniform_int8_numba.run
    monkeypatch.setattr(uniform_int8_numba, "run", lambda *args: calls.append(1) or run(*args))
    fused.decode(5, caches[0]), unfused.decode(5, caches[1])
    assert calls  # integer activations by default
    monkeypatch.setenv("QLLM_ACTIVATIONS", "float")
    calls.clear()
    a, b = fused.decode(7, caches[0]), unfused.decode(7, caches[1])  # [vocab] each
    assert not calls and np.abs(a - b).max() <= TOL * np.abs(b).max()
    for model in (fused, unfused):
        w = model.layers[1]["mlp.down_proj.weight"]
        model.layers[1]["mlp.down_proj.weight"] = np.zeros(w.shape, dtype=np.float32)  # [d, ffn]
    a, b = fused.decode(11, caches[0]), unfused.decode(11, caches[1])  # [vocab] each
    assert np.abs(a - b).max() <= TOL * np.abs(b).max()


@pytest.mark.parametrize("quantized", [False, True])
def test_smollm2(smollm2_dir, quantized, monkeypatch):
    monkeypatch.setenv("QLLM_ACTIVATIONS", "float")
    hf_config, tensors = load_checkpoint(smollm2_dir)
    tensors = packed(tensors, 128) if quantized else tensors
    assert_decode_steps_match(Config.from_hf(hf_config), tensors, [1, 504, 3458, 314], [282, 4077, 30])


def decode_both_ways(config: Config, tensors: dict, prompt, steps):
    """Logits of each step with the layers in one Numba call (runtime/kernels/decode_layers_numba.py) and with
    the same kernels called from Python (Model.llama_decode_layers, opt_decode_step's loop); asserts the first
    model took the one call."""
    one_call, loop = Model(config, tensors), Model(config, tensors)
    caches = one_call.new_cache(len(prompt) + len(steps)), loop.new_cache(len(prompt) + len(steps))
    for model, cache in zip((one_call, loop), caches):
        model.prefill(prompt, cache)
        model.one_row_products()
    assert one_call._one_row_products["layer_calls"] is not None
    loop._one_row_products["layer_calls"] = None  # the Python loop over the same prepared products
    logits = [(one_call.decode(int(t), caches[0]), loop.decode(int(t), caches[1])) for t in steps]
    assert np.array_equal(caches[0].k, caches[1].k) and np.array_equal(caches[0].v, caches[1].v)
    return logits


@pytest.mark.parametrize("case", ["llama-gqa-tied", "llama-untied", "llama-attention-bias", "opt-pre-ln",
                                  "opt-post-ln", "opt-project-in-out"])
@pytest.mark.parametrize("bits, group_size", [(4, 32), (2, 32), (3, -1)])
def test_layers_in_one_call_equal_the_python_loop(case, bits, group_size, tmp_path):
    # the same kernels in the same order on the same values: equal up to LLVM's freedom to reorder the
    # inlined elementwise sums (fastmath), 1e-6 of max |logit|; measured: bit for bit
    build_hf(*CASES[case]).save_pretrained(tmp_path)
    hf_config, tensors = load_checkpoint(tmp_path)
    rng = np.random.default_rng(4)  # biases and norms away from HF's zeros and ones, so that each one shows
    tensors = {name: np.asarray(t) + rng.uniform(-0.5, 0.5, t.shape).astype(np.float32)
               if name.endswith(".bias") or "norm" in name else t for name, t in tensors.items()}
    params = rtn.RTNParams(bits=bits, group_size=group_size)
    tensors = {name: rtn.quantize(np.asarray(t), params) if name.split(".")[-2] in LINEARS
               and name.endswith(".weight") else t for name, t in tensors.items()}
    ids = np.random.default_rng(3).integers(0, 120, 12)
    for a, b in decode_both_ways(Config.from_hf(hf_config), tensors, ids[:7], ids[7:]):
        assert np.abs(b).max() > 0 and np.abs(a - b).max() <= 1e-6 * np.abs(b).max()


def test_smollm2_nf4_layers_in_one_call(smollm2_dir):
    import nf4
    hf_config, tensors = load_checkpoint(smollm2_dir)
    tensors = {name: nf4.quantize(np.asarray(t), nf4.NF4Params()) if name.split(".")[-2] in LINEARS
               and ".layers." in name else t for name, t in tensors.items()}
    for a, b in decode_both_ways(Config.from_hf(hf_config), tensors, [1, 504, 3458, 314], [282, 4077]):
        assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()


def random_weight(tag: str, shape, seed: int):
    """A packed weight of random codes in the format of `tag` (bench_models.random_packed); E8P's with stage
    scales of their own (random_packed's are one value for every weight)."""
    from bench_models import random_packed
    from runtime import e8p_codebook
    from runtime.formats.e8p import E8PTensor
    packed = random_packed(tag, shape, seed)
    if not isinstance(packed, E8PTensor):
        return packed
    scales = e8p_codebook.stage_scales(packed.bits, rms=0.01 * (1 + seed % 7))
    return E8PTensor.from_codes(packed.stage_codes, scales, packed.signs_in, packed.signs_out, packed.bits, shape)


@pytest.mark.parametrize("tag", ["quipsharp2", "quipsharp3", "quipsharp4", "rtn2g64", "rtn4g128", "nf4", "spqr3g32t50",
                                 "gptq4g128", "int8t150", "absmax8", "quip2", "quip4"])
def test_random_code_layers_in_one_call_equal_the_python_loop(tag, tmp_path):
    # every layer's own random codes (a product read from the wrong layer shows), E8P at every bit width
    from runtime.kernels.uniform_int8_numba import available_kernels
    if tag.startswith("quipsharp") and "avx512vnni" not in available_kernels():
        pytest.skip("E8P's int8 decode kernel needs AVX-512 VNNI")
    assert_one_call_equals_the_loop(tmp_path, tag)


@pytest.mark.parametrize("tag", ["quipsharp2", "int8t150", "quip2", "nf4", "spqr3g32t50"])
def test_opt_random_code_layers_in_one_call_equal_the_python_loop(tag, tmp_path):
    # OPT's biases added after each product kind (E8P, int8, incoherent, uniform with a table, SpQR's outliers)
    from runtime.kernels.uniform_int8_numba import available_kernels
    if tag.startswith("quipsharp") and "avx512vnni" not in available_kernels():
        pytest.skip("E8P's int8 decode kernel needs AVX-512 VNNI")
    assert_one_call_equals_the_loop(tmp_path, tag, arch="opt")


@pytest.mark.parametrize("kernel, mode, tag", [("avx2", "int8", "rtn2g64"), ("avx2", "int8", "int8"),
                                               ("portable", "int8-all", "rtn4g128"),
                                               ("portable", "int8-all", "nf4"), ("portable", "int8-all", "int8")])
def test_layers_in_one_call_with_the_other_kernels(kernel, mode, tag, tmp_path, monkeypatch):
    # the CPUs without AVX-512 (QLLM_INT8_KERNEL) take the one call with their own tiles or the portable lanes
    from runtime.kernels.uniform_int8_numba import available_kernels
    if kernel not in available_kernels():
        pytest.skip(f"this CPU has no {kernel}")
    monkeypatch.setenv("QLLM_INT8_KERNEL", kernel)
    monkeypatch.setenv("QLLM_ACTIVATIONS", mode)
    assert_one_call_equals_the_loop(tmp_path, tag)


def assert_one_call_equals_the_loop(tmp_path, tag: str, arch: str = "llama"):
    """A three-layer Llama (or OPT, its biases and LayerNorms drawn at random) with random codes of `tag`
    (`random_weight`) decodes the same logits in one call as through the Python loop, within 1e-6 of max
    |logit|."""
    import torch
    import transformers
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=120,
                                          max_position_embeddings=64, tie_word_embeddings=False)  # E8P: 64-input dots
        transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    else:
        config = transformers.OPTConfig(hidden_size=128, ffn_dim=192, num_hidden_layers=3, num_attention_heads=4,
                                        vocab_size=120, max_position_embeddings=64, word_embed_proj_dim=128)
        transformers.OPTForCausalLM(config).save_pretrained(tmp_path)
    hf_config, tensors = load_checkpoint(tmp_path)
    rng = np.random.default_rng(6)
    tensors = {name: np.asarray(t) + rng.uniform(-0.5, 0.5, t.shape).astype(np.float32)
               if arch == "opt" and (name.endswith(".bias") or "norm" in name) else t for name, t in tensors.items()}
    tensors = {name: random_weight(tag, t.shape, k) if name.split(".")[-2] in LINEARS and name.endswith(".weight")
               else t for k, (name, t) in enumerate(tensors.items())}
    ids = np.random.default_rng(5).integers(0, 120, 10)
    for a, b in decode_both_ways(Config.from_hf(hf_config), tensors, ids[:6], ids[6:]):
        assert np.abs(b).max() > 0 and np.abs(a - b).max() <= 1e-6 * np.abs(b).max()


@pytest.mark.parametrize("case, change", [("llama-attention-bias", None), ("opt-pre-ln", None),
                                          ("opt-post-ln", None), ("opt-pre-ln", "float weight"),
                                          ("llama-gqa-tied", "float weight"), ("llama-gqa-tied", "float mode"),
                                          ("llama-gqa-tied", None)])
def test_the_layers_take_one_call_only_where_every_product_is_a_prepared_call(case, change, tmp_path,
                                                                             monkeypatch):
    # one float weight among the packed ones, float activations: the Python loop; biases and OPT: one call
    build_hf(*CASES[case]).save_pretrained(tmp_path)
    hf_config, tensors = load_checkpoint(tmp_path)
    tensors = packed(tensors, 32)
    if change == "float weight":
        name = next(n for n in tensors if n.endswith("layers.1.mlp.up_proj.weight") or n.endswith("layers.1.fc1.weight"))
        tensors[name] = tensors[name].dequantize()
    if change == "float mode":
        monkeypatch.setenv("QLLM_ACTIVATIONS", "float")
    model = Model(Config.from_hf(hf_config), tensors)
    model.decode(3, model.new_cache(4))
    assert (model._one_row_products["layer_calls"] is not None) == (change is None)


def test_exp32_against_numpy():
    """exp32 (Cephes' expf, vectorized) within 3e-7 relative of float64 e^x on [-80, 80]; clamped beyond
    (no inf, no NaN), and the SiLU built on it equals g * sigmoid(g) in float64 within 1e-6 relative."""
    from runtime.kernels.decode_step_numba import silu_mul
    from runtime.kernels.numba_common import exp32
    from numba import njit

    @njit
    def exp_all(x):
        out = np.empty_like(x)
        for i in range(x.shape[0]):
            out[i] = exp32(x[i])
        return out

    x = np.linspace(-80, 80, 400_001).astype(np.float32)
    ref = np.exp(x.astype(np.float64))
    assert (np.abs(exp_all(x) - ref) / ref).max() <= 3e-7
    extremes = exp_all(np.array([-1e4, -100, 100, 1e4], np.float32))
    assert np.isfinite(extremes).all() and extremes[0] < 1e-37 and extremes[-1] > 1e38
    gate = np.concatenate([np.linspace(-200, 200, 4001), [0.0]]).astype(np.float32)
    up = np.random.default_rng(0).standard_normal(gate.shape[0]).astype(np.float32)
    g64 = gate.astype(np.float64)
    ref = g64 / (1 + np.exp(-g64)) * up
    assert np.allclose(silu_mul(gate, up), ref, rtol=1e-6, atol=1e-30)


def test_layer_norm_kernel_against_float64():
    from runtime.kernels.decode_step_numba import layer_norm

    rng = np.random.default_rng(4)
    x = (rng.standard_normal(777) * 3 + 5).astype(np.float32)  # an offset mean, as residual streams have
    weight, bias = rng.standard_normal((2, 777)).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean()) / np.sqrt(x64.var() + 1e-5) * weight + bias
    assert np.abs(layer_norm(x, weight, bias, 1e-5) - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("heads, kv_heads", [(6, 2), (4, 4), (9, 3), (5, 1)])
def test_attend_kernel_against_float64(heads, kv_heads):
    # grouped-query attention over the cache, the step's key and value written first: each query head
    # h reads kv head h // (heads / kv_heads); float64 softmax(q k^T / sqrt(hd)) v as the reference
    from runtime.kernels.decode_step_numba import attend

    rng = np.random.default_rng(heads)
    hd, position = 16, 23
    keys, values = rng.standard_normal((2, kv_heads, 40, hd)).astype(np.float32)  # [KV, max_len, hd] each
    q = rng.standard_normal(heads * hd).astype(np.float32)  # [H*hd]
    k, v = rng.standard_normal((2, kv_heads * hd)).astype(np.float32)  # [KV*hd] each
    out = attend(q, k, v, keys, values, position)  # [H*hd]
    assert np.array_equal(keys[:, position], k.reshape(kv_heads, hd))
    assert np.array_equal(values[:, position], v.reshape(kv_heads, hd))
    for h in range(heads):
        g = h // (heads // kv_heads)
        scores = keys[g, :position + 1].astype(np.float64) @ q[h * hd:(h + 1) * hd] / np.sqrt(hd)  # [S]
        p = np.exp(scores - scores.max())
        ref = (p / p.sum()) @ values[g, :position + 1].astype(np.float64)  # [hd]
        assert np.abs(out[h * hd:(h + 1) * hd] - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("tag, graph", [(None, True), ("rtn4g128", True), ("quipsharp2", True), ("quip2", False)])
def test_which_models_take_the_cuda_graph_step(tag, graph):
    """A Llama is decoded on the GPU as one CUDA graph per step when every weight's product can be captured:
    float weights and every packed format but QuIP's incoherent one (its transforms multiply through cuBLAS);
    OPT is not (its step has biases and learned positions, not written as a graph). Decided from the weights
    alone, so it is checked here without a GPU."""
    import bench_models
    from runtime import cuda_graph_step
    hf = dict(bench_models.hf_config("tinyllama-1.1b"), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    tensors = bench_models.float_tensors(hf, seed=1) if tag is None else bench_models.packed_tensors(hf, tag, seed=1)
    assert cuda_graph_step.takes(Model(Config.from_hf(hf), tensors)) is graph
    opt = dict(bench_models.hf_config("opt-1.3b"), hidden_size=256, ffn_dim=512, num_hidden_layers=2,
               num_attention_heads=4, vocab_size=512, word_embed_proj_dim=256)
    assert not cuda_graph_step.takes(Model(Config.from_hf(opt), bench_models.float_tensors(opt, seed=1)))


def test_direct_calls_type_each_array_kind_once():
    """DirectCalls (how the fused step is called) gives the dispatcher's answer for arrays of another dtype,
    layout or writability than the first call's (each typed and compiled once, not run through the first
    call's code), and reuses the compiled code for arrays like one met before."""
    from numba import njit
    from runtime.kernels.numba_common import DirectCalls

    @njit
    def weighted_sum(a, weight):
        total = 0.0
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                total += a[i, j] * weight * (i + 1)
        return total

    direct = DirectCalls()
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    readonly = base.copy()
    readonly.flags.writeable = False
    arrays = [base, base.astype(np.float64), base.astype(np.int16), np.asfortranarray(base),
              np.arange(24, dtype=np.float32).reshape(3, 8)[:, ::2], readonly, base + 1]
    for a in arrays:
        assert direct(weighted_sum, a, 2) == weighted_sum(a, 2)
    assert len(direct.compiled) == 6  # base + 1 reuses base's
