"""Tests of runtime/importers: GPTQ, AWQ, bitsandbytes and QuIP# checkpoints load into our formats exactly.

None of auto-gptq, gptqmodel, optimum, autoawq or bitsandbytes is installed
in the test environment (their packers need CUDA kernels or a CUDA torch),
so each checkpoint is written by a helper here that follows the library's
published packing code (cited in each helper) from a random tiny Llama
(conftest.save_tiny_llama). Every test asserts that our dequantized weights
equal the layout's own dequantization formula, and that our logits equal
transformers' on those weights within 1e-3.
"""
import functools
import itertools
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import save_tiny_llama
from runtime import e8p_codebook
from runtime.errors import UserError
from runtime.checkpoints.importers import is_quantized_checkpoint, load_quantized_checkpoint
from runtime.checkpoints.importers import quipsharp

SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(directory, float32 state dict) of a random tiny Llama with Llama 2's tokenizer."""
    path = tmp_path_factory.mktemp("base")
    model = save_tiny_llama(path, **SHAPE)
    return path, {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}


def write_checkpoint(path, base, tensors: dict, quantization: dict | None, extra_config: dict | None = None):
    """A copy of the base directory with `tensors` (float ones kept from the base unless replaced)."""
    base_dir, state = base
    path.mkdir()
    shutil.copy(base_dir / "tokenizer.model", path / "tokenizer.model")
    config = json.loads((base_dir / "config.json").read_text())
    if quantization is not None:
        config["quantization_config"] = quantization
    config.update(extra_config or {})
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def float_rest(state: dict, packed_modules) -> dict:
    """The base tensors that are not packed, in float16 (as the libraries save them)."""
    return {k: v.astype(np.float16) for k, v in state.items() if not any(k == m + ".weight" for m in packed_modules)}


def layer_modules(layer: int = 0):
    return [f"model.layers.{layer}.{p}" for p in PROJ]


def our_logits(path, ids):
    from model import Config, Model
    config, tensors = load_quantized_checkpoint(path)
    model = Model(Config.from_hf(config), tensors)
    return model.prefill(ids, model.new_cache(len(ids)), all_logits=True)  # [T, vocab]


def torch_logits(base, weights: dict, ids):
    """transformers' logits of the base model with `weights` (HF name -> float32 [out, in]) put in."""
    import torch
    import transformers
    base_dir, _ = base
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    state = model.state_dict()
    for name, w in weights.items():
        state[name] = torch.from_numpy(np.asarray(w, dtype=np.float32))
    model.load_state_dict(state)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def check_against_torch(base, path, weights: dict):
    """Our logits of the imported checkpoint == transformers' on the layout's dequantized weights (1e-3)."""
    ids = [1, 450, 4996, 17354, 1701, 29916, 432, 17204]
    _, state = base
    fp16_rest = {k: v.astype(np.float16).astype(np.float32) for k, v in state.items() if k not in weights}
    expected = torch_logits(base, {**fp16_rest, **weights}, ids)
    np.testing.assert_allclose(our_logits(path, ids), expected, atol=1e-3, rtol=0)


# ---- GPTQ ----

def gptq_pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """uint32 values [n, cols] -> int32 [n/32 * bits, cols]: AutoGPTQ's QuantLinear.pack loop
    (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py, `pack`, the `while row < qweight.shape[0]` loop):
    2/4/8 bits: word r holds values r*32/b .. +32/b-1, value j at bit b*j; 3 bits: 10 values, then value 10
    split over words 0 (bits 30-31) and 1 (bit 0), 10 values at bit 3j+1, value 21 split over words 1
    (bit 31) and 2 (bits 0-1), 10 values at bit 3j+2."""
    values = values.astype(np.uint32)
    out = np.zeros((values.shape[0] // 32 * bits, values.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < out.shape[0]:
        if bits != 3:
            for j in range(32 // bits):
                out[row] |= values[i + j] << np.uint32(bits * j)
            i, row = i + 32 // bits, row + 1
            continue
        for shift, (lo_shift, carry_bits) in enumerate(((30, 2), (31, 1), (None, None))):
            for j in range(10):
                out[row] |= values[i + j] << np.uint32(3 * j + shift)
            i += 10
            if lo_shift is None:
                row += 1
                break
            out[row] |= values[i] << np.uint32(lo_shift)
            out[row + 1] |= (values[i] >> np.uint32(carry_bits)) & np.uint32((1 << (3 - carry_bits)) - 1)
            i, row = i + 1, row + 1
    return out.view(np.int32)


def rtn_grid(w: np.ndarray, bits: int, group: int, sym: bool, g_idx: np.ndarray):
    """(codes [in, out], scales fp16 [groups, out], zeros [groups, out]) of a round-to-nearest grid, with GPTQ's
    act-order group assignment g_idx [in]."""
    n_out, n_in = w.shape
    n_groups = int(g_idx.max()) + 1
    maxq = (1 << bits) - 1
    scales = np.zeros((n_groups, n_out), np.float16)
    zeros = np.zeros((n_groups, n_out), np.int64)
    codes = np.zeros((n_in, n_out), np.int64)
    for g in range(n_groups):
        cols = np.flatnonzero(g_idx == g)
        lo, hi = np.minimum(w[:, cols].min(1), 0), np.maximum(w[:, cols].max(1), 0)
        if sym:
            hi = np.maximum(-lo, hi)
            lo = -hi
        s = ((hi - lo) / maxq).astype(np.float16)
        z = np.full(n_out, (maxq + 1) // 2) if sym else np.clip(np.round(-lo / s.astype(np.float32)), 1, maxq)
        scales[g], zeros[g] = s, z
        codes[cols] = np.clip(np.round(w[:, cols] / s.astype(np.float32)[:, None]) + z[:, None], 0, maxq).T
    return codes, scales, zeros


def gptq_checkpoint(path, base, bits, group, desc_act, sym, fmt, lm_head=False):
    """A GPTQ checkpoint of the base and {HF name: W} by AutoGPTQ's formula W = scales[g_idx] * (q - zero)."""
    _, state = base
    rng = np.random.default_rng(bits * 7 + group)
    modules = layer_modules() + (["lm_head"] if lm_head else [])
    tensors, weights = float_rest(state, modules), {}
    for m in modules:
        w = state[m + ".weight"]
        n_in = w.shape[1]
        size = n_in if group == -1 else group
        order = rng.permutation(n_in) if desc_act else np.arange(n_in)
        g_idx = np.empty(n_in, np.int32)
        g_idx[order] = np.arange(n_in) // size
        codes, scales, zeros = rtn_grid(w, bits, size, sym, g_idx)
        stored_zeros = zeros - (1 if fmt == "gptq" else 0)
        tensors.update({m + ".qweight": gptq_pack_rows(codes, bits),
                        m + ".qzeros": np.ascontiguousarray(gptq_pack_rows(stored_zeros.T, bits).T),
                        m + ".scales": scales, m + ".g_idx": g_idx})
        weights[m + ".weight"] = ((codes - zeros[g_idx]) * scales[g_idx].astype(np.float32)).T
    config = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
              "true_sequential": True, "static_groups": False, "checkpoint_format": fmt, "lm_head": lm_head}
    return write_checkpoint(path, base, tensors, config), weights


@pytest.mark.parametrize("bits,group,desc_act,sym,fmt", [
    (4, 32, False, True, "gptq"), (4, 32, True, False, "gptq"), (3, 32, True, False, "gptq"),
    (2, 64, False, False, "gptq_v2"), (8, -1, False, True, "gptq"), (3, -1, True, True, "gptq_v2")])
def test_gptq_dequantizes_to_autogptq_formula(tmp_path, base, bits, group, desc_act, sym, fmt):
    path, weights = gptq_checkpoint(tmp_path / "gptq", base, bits, group, desc_act, sym, fmt)
    assert is_quantized_checkpoint(path)
    _, tensors = load_quantized_checkpoint(path)
    for name, w in weights.items():
        assert tensors[name].bits == bits
        np.testing.assert_array_equal(tensors[name].dequantize(), w)


def test_gptq_logits_match_transformers(tmp_path, base):
    path, weights = gptq_checkpoint(tmp_path / "gptq", base, 4, 32, True, False, "gptq", lm_head=True)
    check_against_torch(base, path, weights)


def test_gptq_quantize_config_json(tmp_path, base):
    path, weights = gptq_checkpoint(tmp_path / "gptq", base, 4, 32, False, True, "gptq")
    config = json.loads((path / "config.json").read_text())
    (path / "quantize_config.json").write_text(json.dumps(config.pop("quantization_config")))
    (path / "config.json").write_text(json.dumps(config))
    _, tensors = load_quantized_checkpoint(path)
    name = next(iter(weights))
    np.testing.assert_array_equal(tensors[name].dequantize(), weights[name])


# ---- AWQ ----

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_pack(values: np.ndarray) -> np.ndarray:
    """uint values [rows, cols] -> int32 [rows, cols/8]: AutoAWQ's WQLinear_GEMM.from_linear
    (awq/modules/linear/gemm.py): word c holds column 8c + order_map[i] at bits 4i, order_map [0,2,4,6,1,3,5,7]."""
    out = np.zeros((values.shape[0], values.shape[1] // 8), np.uint32)
    for c in range(out.shape[1]):
        for i in range(8):
            out[:, c] |= values[:, 8 * c + AWQ_ORDER[i]].astype(np.uint32) << np.uint32(4 * i)
    return out.view(np.int32)


def awq_checkpoint(path, base, group):
    _, state = base
    modules = layer_modules()
    tensors, weights = float_rest(state, modules), {}
    for m in modules:
        w = state[m + ".weight"]
        g_idx = np.arange(w.shape[1]) // group
        codes, scales, zeros = rtn_grid(w, 4, group, False, g_idx)
        tensors.update({m + ".qweight": awq_pack(codes), m + ".qzeros": awq_pack(zeros), m + ".scales": scales})
        weights[m + ".weight"] = ((codes - zeros[g_idx]) * scales[g_idx].astype(np.float32)).T
    config = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    return write_checkpoint(path, base, tensors, config), weights


@pytest.mark.parametrize("group", [32, 64])
def test_awq_dequantizes_to_autoawq_formula(tmp_path, base, group):
    path, weights = awq_checkpoint(tmp_path / "awq", base, group)
    _, tensors = load_quantized_checkpoint(path)
    for name, w in weights.items():
        np.testing.assert_array_equal(tensors[name].dequantize(), w)
    check_against_torch(base, path, weights)


# ---- bitsandbytes ----

def bnb_4bit(w: np.ndarray, table: np.ndarray, block: int, nested_code: np.ndarray | None):
    """(arrays, quant state, W) of one Linear4bit, following bitsandbytes: quantize_4bit over the flattened
    weight in blocks (absmax, nearest table entry), codes packed two per byte with the first in the high
    nibble; double quantization (QuantState `nested_*`, bitsandbytes/functional.py quantize_4bit with
    compress_statistics) quantizes absmax - mean in blocks of 256 with the dynamic map."""
    flat = w.reshape(-1, block)  # [blocks, block]
    absmax = np.abs(flat).max(1).astype(np.float32)
    codes = np.abs(flat[..., None] / absmax[:, None, None] - table).argmin(-1).reshape(-1)  # [n]
    arrays = {"weight": ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)[:, None], "quant_map": table}
    state = {"quant_type": "nf4", "blocksize": block, "dtype": "float16", "shape": list(w.shape)}
    if nested_code is None:
        arrays["absmax"] = absmax
    else:
        offset = np.float32(absmax.mean())
        centred = np.pad(absmax - offset, (0, -len(absmax) % 256)).reshape(-1, 256)
        scale = np.abs(centred).max(1).astype(np.float32)
        q = np.abs(centred[..., None] / scale[:, None, None] - nested_code).argmin(-1).reshape(-1)[:len(absmax)]
        arrays.update(absmax=q.astype(np.uint8), nested_absmax=scale, nested_quant_map=nested_code)
        state.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(offset))
        absmax = nested_code[q] * scale[np.arange(len(absmax)) // 256] + offset
    return arrays, state, (table[codes].reshape(-1, block) * absmax[:, None]).reshape(w.shape)


@pytest.mark.parametrize("kind,nested", [("nf4", None), ("nf4", "dynamic"), ("fp4", "dynamic"), ("nf4", "other")])
def test_bitsandbytes_4bit(tmp_path, base, kind, nested):
    import nf4
    from runtime.formats.lut4 import dynamic_map
    _, state = base
    table = nf4.nf4_table() if kind == "nf4" else nf4.fp4_table()
    code = None if nested is None else dynamic_map() if nested == "dynamic" else dynamic_map() * np.float32(0.99)
    modules = layer_modules()
    tensors, weights = float_rest(state, modules), {}
    for m in modules:
        arrays, qstate, w = bnb_4bit(state[m + ".weight"], table.astype(np.float32), 64, code)
        qstate["quant_type"] = kind
        tensors.update({f"{m}.weight" + ("" if k == "weight" else "." + k): a for k, a in arrays.items()})
        tensors[f"{m}.weight.quant_state.bitsandbytes__{kind}"] = np.frombuffer(json.dumps(qstate).encode(), np.uint8)
        weights[m + ".weight"] = w
    config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
              "bnb_4bit_quant_type": kind, "bnb_4bit_use_double_quant": nested is not None}
    path = write_checkpoint(tmp_path / "bnb", base, tensors, config)
    _, loaded = load_quantized_checkpoint(path)
    for name, w in weights.items():
        assert loaded[name].double_quant == (nested == "dynamic")
        np.testing.assert_array_equal(loaded[name].dequantize(), w)
    check_against_torch(base, path, weights)


def test_bitsandbytes_int8(tmp_path, base):
    _, state = base
    modules = layer_modules()
    tensors, weights = float_rest(state, modules), {}
    for m in modules:
        w = state[m + ".weight"]
        scb = np.abs(w).max(1).astype(np.float32)  # bitsandbytes' int8_vectorwise_quant: row absmax
        q = np.round(w * (127 / scb[:, None])).astype(np.int8)
        tensors.update({m + ".weight": q, m + ".SCB": scb})
        weights[m + ".weight"] = q.astype(np.float32) * scb[:, None] / 127
    config = {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 6.0}
    path = write_checkpoint(tmp_path / "int8", base, tensors, config)
    _, loaded = load_quantized_checkpoint(path)
    for name, w in weights.items():
        np.testing.assert_allclose(loaded[name].dequantize(), w, rtol=1e-6, atol=0)
        assert loaded[name].outlier_threshold == 6.0


# ---- QuIP# ----

# lib/codebook/latticee8_padded12.py get_norm12 of quip-sharp, as 2a (the test's own copy of the published table)
QUIP_NORM12 = [[3, 1, 1, 1, 3, 3, 3, 3], [1, 3, 1, 1, 3, 3, 3, 3], [1, 1, 3, 1, 3, 3, 3, 3], [1, 1, 1, 3, 3, 3, 3, 3],
               [3, 3, 3, 1, 3, 3, 1, 1], [3, 3, 3, 1, 3, 1, 3, 1], [3, 3, 3, 1, 1, 3, 3, 1], [3, 3, 3, 1, 3, 1, 1, 3],
               [3, 3, 3, 1, 1, 3, 1, 3], [3, 3, 3, 1, 1, 1, 3, 3], [3, 3, 1, 3, 3, 3, 1, 1], [3, 3, 1, 3, 3, 1, 3, 1],
               [3, 3, 1, 3, 1, 3, 3, 1], [3, 3, 1, 3, 3, 1, 1, 3], [3, 3, 1, 3, 1, 3, 1, 3], [3, 3, 1, 3, 1, 1, 3, 3],
               [3, 1, 3, 3, 3, 3, 1, 1], [3, 1, 3, 3, 3, 1, 3, 1], [3, 1, 3, 3, 1, 3, 3, 1], [3, 1, 3, 3, 3, 1, 1, 3],
               [3, 1, 3, 3, 1, 3, 1, 3], [1, 3, 3, 3, 1, 1, 3, 3], [1, 3, 3, 3, 3, 3, 1, 1], [1, 3, 3, 3, 3, 1, 3, 1],
               [1, 3, 3, 3, 1, 3, 3, 1], [1, 3, 3, 3, 3, 1, 1, 3], [1, 3, 3, 3, 1, 3, 1, 3], [1, 1, 3, 3, 1, 3, 3, 3],
               [3, 3, 1, 1, 3, 3, 3, 1]]


def quip_source() -> np.ndarray:
    """quip-sharp's get_abs_grid [256, 8]: the half-integer vectors of norm² <= 10 with all entries positive in
    lexicographic order (torch.unique's sorted rows), then get_norm12's 29."""
    inner = [a for a in itertools.product((1, 3, 5), repeat=8) if sum(v * v for v in a) <= 40]
    return np.array(inner + QUIP_NORM12, dtype=np.float32) / 2


def quip_point(code: int, source: np.ndarray) -> np.ndarray:
    """One E8P point of quip-sharp's codebook_version 1 (lib/codebook/latticee8_padded12.py get_full_grid):
    source c >> 8 with coordinate 7 negated for an odd sum, signs = c & 255 XOR its parity, coordinate i
    negated by sign bit shuffle_map[i] = [0,4,1,5,2,6,3,7][i], shift -1/4 for odd parity else +1/4."""
    a = source[code >> 8].copy()
    if int(a.sum()) % 2:
        a[7] = -a[7]
    signs = code & 255
    parity = bin(signs).count("1") & 1
    signs ^= parity
    for i, bit in enumerate((0, 4, 1, 5, 2, 6, 3, 7)):
        if (signs >> bit) & 1:
            a[i] = -a[i]
    return a + (-0.25 if parity else 0.25)


@functools.cache
def quip_grid() -> np.ndarray:
    """Every code's `quip_point` [65536, 8] (get_full_grid's synth_codebook), computed once."""
    source = quip_source()
    return np.array([quip_point(code, source) for code in range(1 << 16)])


def quip_pack(codes: np.ndarray) -> np.ndarray:
    """uint16 codes [m, n] -> int64 [m, n/4]: quip-sharp's E8P12_codebook.maybe_pack_idxs
    (lib/codebook/latticee8_padded12.py): rows and codes in pairs, abs bytes at 8*(i + 2j), sign bit b of code
    (i, j) at 32 + 4b + (i + 2j), then tiles reshape(m/16, 8, n/8, 4).transpose(1, 2)."""
    m, n = codes.shape
    pairs = codes.astype(np.uint64).reshape(m // 2, 2, n // 2, 2).transpose(0, 2, 1, 3)  # [m/2, n/2, i, j]
    word = np.zeros((m // 2, n // 2), np.uint64)
    for t in range(4):
        c = pairs[:, :, t % 2, t // 2]
        word |= (c >> np.uint64(8)) << np.uint64(8 * t)
        for b in range(8):
            word |= ((c >> np.uint64(b)) & np.uint64(1)) << np.uint64(32 + 4 * b + t)
    return np.ascontiguousarray(word.reshape(m // 16, 8, n // 8, 4).transpose(0, 2, 1, 3)).reshape(m, n // 4).view(
        np.int64)


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def quip_e81b_grid() -> np.ndarray:
    """quip-sharp's 1-bit E8 grid (lib/codebook/latticee8_padded12_rvq3bit.py get_e81bgrid) [256, 8]: the points
    of (Z^8 ∪ (Z + 1/2)^8) with even sum and norm² <= 2, integer ones first, each in cartesian_prod order, then
    +2e_0 .. +2e_7, -2e_0 .. -2e_6."""
    integer = [p for p in itertools.product(range(-4, 4), repeat=8) if sum(p) % 2 == 0 and sum(v * v for v in p) <= 2]
    half = [p for p in itertools.product(np.arange(-4, 4) + 0.5, repeat=8)
            if sum(p) % 2 == 0 and sum(v * v for v in p) <= 2]
    axis = [2 * np.eye(8)[k] for k in range(8)] + [-2 * np.eye(8)[k] for k in range(7)]
    return np.array(integer + half + axis, dtype=np.float64)


def quip_pack_e81b(codes: np.ndarray) -> np.ndarray:
    """uint8-valued codes [m, n] -> int64 [m, n/8]: pack_e81b of rvq3bit.py's maybe_pack_idxs (code 8j + i in
    byte i of word j)."""
    words = np.zeros((codes.shape[0], codes.shape[1] // 8), np.uint64)
    for i in range(8):
        words |= codes[:, i::8].astype(np.uint64) << np.uint64(8 * i)
    return words.view(np.int64)


QUIP_LAYOUTS = {2: "E8P12", 3: "E8P12RVQ3B", 4: "E8P12RVQ4B"}  # bits -> quip_params codebook
QUIP_RESID = {3: 2.04, 4: 3.45}  # each codebook's opt_resid_scale


def quip_checkpoint(path, base, real_scales: bool, bits: int = 2):
    """A QuIP# checkpoint (fused qkv and upgate, o, down) and {HF name: W} by quip-sharp's formula
    W = diag(SV) H Wscale·Ŵ Hᵀ diag(SU) (quantized_linear.py / matmul_had.py), fused parts times fuse_scales.
    2 bits: Ŵ = E8P(c1), Qidxs = maybe_pack_idxs(c1); 3 bits: Ŵ = E8P(c1) + E8(c2) / 2.04, Qidxs = [pack_e8p(c1),
    pack_e81b(c2)] (latticee8_padded12_rvq3bit.py); 4 bits: Ŵ = E8P(c1) + E8P(c2) / 3.45, Qidxs = [pack(c1),
    pack(c2)] and no Wscale (rvq4bit.py: its layer's scale of 32 divides x and multiplies y)."""
    _, state = base
    rng = np.random.default_rng(3)
    fused = {"self_attn.qkv_proj": [("self_attn.q_proj", 64), ("self_attn.k_proj", 32), ("self_attn.v_proj", 32)],
             "mlp.upgate_proj": [("mlp.up_proj", 128), ("mlp.gate_proj", 128)],
             "self_attn.o_proj": [("self_attn.o_proj", 64)], "mlp.down_proj": [("mlp.down_proj", 64)]}
    prefix = "model.layers.0."
    tensors = {k: v.astype(np.float16) for k, v in state.items() if not any(p in k for p in PROJ)}
    weights = {}
    for module, parts in fused.items():
        rows = sum(r for _, r in parts)
        n_in = 128 if module == "mlp.down_proj" else 64
        src = rng.integers(0, 256, size=(rows, n_in // 8))
        codes = (src << 8 | rng.integers(0, 256, size=src.shape)).astype(np.uint16)
        second = rng.integers(0, 256 if bits == 3 else 1 << 16, size=src.shape)  # the residual stage's codes
        su = rng.choice([-1.0, 1.0], n_in) * (rng.uniform(0.5, 1.5, n_in) if real_scales else 1)
        sv = rng.choice([-1.0, 1.0], rows) * (rng.uniform(0.5, 1.5, rows) if real_scales else 1)
        su, sv = su.astype(np.float16).astype(np.float64), sv.astype(np.float16).astype(np.float64)  # as stored
        wscale = np.array(0.02 if bits < 4 else 1.0, np.float32)  # a scalar tensor, as torch saves it
        fuse = rng.uniform(0.5, 2, len(parts)).astype(np.float32) if len(parts) > 1 else np.ones(1, np.float32)
        w_hat = quip_grid()[codes].reshape(rows, n_in)
        qidxs = [quip_pack(codes)]
        if bits == 3:
            w_hat = w_hat + quip_e81b_grid()[second].reshape(rows, n_in) / QUIP_RESID[3]
            qidxs.append(quip_pack_e81b(second))
        if bits == 4:
            w_hat = w_hat + quip_grid()[second].reshape(rows, n_in) / QUIP_RESID[4]
            qidxs.append(quip_pack(second.astype(np.uint16)))
        w = sv[:, None] * (sylvester(rows) @ (wscale * w_hat) @ sylvester(n_in).T) * su
        tensors.update({prefix + module + ".Qidxs": np.concatenate(qidxs, axis=1),
                        prefix + module + ".SU": su.astype(np.float16), prefix + module + ".SV": sv.astype(np.float16)})
        if bits < 4:
            tensors[prefix + module + ".Wscale"] = wscale
        if len(parts) > 1:
            tensors[prefix + module + ".fuse_scales"] = fuse
        start = 0
        for (name, r), f in zip(parts, fuse):
            weights[prefix + name + ".weight"] = (w[start:start + r] * f).astype(np.float32)
            start += r
    config = {"quip_params": {"codebook": QUIP_LAYOUTS[bits], "codebook_version": 1, "codesz": 8, "fused": True,
                              "idx_dtype": "torch.int64", "lora_rank": 0, "packsz": 4, "rescale_WH": False,
                              "outlier_channel_split": False}}
    return write_checkpoint(path, base, tensors, None, config), weights


def test_quipsharp_codebook_mapping():
    """Every point of quip-sharp's E8P12 (get_full_grid) and 1-bit E8 (get_e81bgrid) codebooks is one code of the
    "quip-sharp" variant, each of its own: the import is exact and one-to-one."""
    source = quip_source()
    np.testing.assert_array_equal(e8p_codebook.source_codebook("quip-sharp"), source)
    ours = quipsharp.e8p_code_map()
    assert len(np.unique(ours)) == 1 << 16
    np.testing.assert_array_equal(e8p_codebook.decode(ours, "quip-sharp"), quipsharp.quip_e8p_points())
    for code in (0, 1, 255, 256 * 100 + 77, 256 * 240 + 3, 65535):
        np.testing.assert_array_equal(quipsharp.quip_e8p_points()[code], quip_point(code, source))
    np.testing.assert_array_equal(quipsharp.quip_e81b_points(), quip_e81b_grid())
    e81b = quipsharp.e81b_code_map()
    assert len(np.unique(e81b)) == 256
    np.testing.assert_array_equal(e8p_codebook.e8_1bit_decode(e81b, "quip-sharp"), quipsharp.quip_e81b_points())
    # the two variants share the 227 vectors of norm² <= 10 and differ in 18 of the 29 of norm² 12
    theirs, lexicographic = ({tuple(r) for r in e8p_codebook.source_codebook(v)} for v in ("quip-sharp", "lexicographic"))
    assert len(theirs & lexicographic) == 238


@pytest.mark.parametrize("bits, real_scales", [(2, False), (2, True), (3, True), (4, True)])
def test_quipsharp_matches_published_formula(tmp_path, base, bits, real_scales):
    """Codes over all 256 sources (the norm-12 ones included), and every residual code, load to quip-sharp's W
    exactly; the logits equal transformers' on those weights."""
    path, weights = quip_checkpoint(tmp_path / "quip", base, real_scales=real_scales, bits=bits)
    assert is_quantized_checkpoint(path)
    _, tensors = load_quantized_checkpoint(path)
    for name, w in weights.items():
        np.testing.assert_allclose(tensors[name].dequantize(), w, atol=1e-5, rtol=0)
        assert getattr(tensors[name], "shared", None) is None or tensors[name].shared.inner.codebook == "quip-sharp"
    check_against_torch(base, path, weights)


# ---- refusals ----

@pytest.mark.parametrize("change,says", [
    ({"quant_method": "hqq"}, "quant_method 'hqq' is not supported"),
    ({"bits": 5}, "bits=5 is not supported"),
    ({"group_size": 48}, "group_size=48 is not supported"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format='marlin' is not supported"),
    ({"pack_dtype": "int16"}, "pack_dtype='int16' is not supported")])
def test_unsupported_gptq_settings_are_one_line(tmp_path, base, change, says):
    path, _ = gptq_checkpoint(tmp_path / "gptq", base, 4, 32, False, True, "gptq")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(change)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=says) as error:
        load_quantized_checkpoint(path)
    assert "\n" not in str(error.value)


def test_wrong_shapes_and_bad_configs_are_one_line(tmp_path, base):
    path, _ = gptq_checkpoint(tmp_path / "gptq", base, 4, 32, False, True, "gptq")
    from safetensors.numpy import load_file
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.qzeros"] = tensors["model.layers.0.mlp.up_proj.qzeros"][:, :-1]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(UserError, match="up_proj.qzeros' is int32 .* implies int32") as error:
        load_quantized_checkpoint(path)
    assert "\n" not in str(error.value)
    awq, _ = awq_checkpoint(tmp_path / "awq", base, 32)
    config = json.loads((awq / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (awq / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="version='gemv' is not supported"):
        load_quantized_checkpoint(awq)
    config["quantization_config"] = "gptq"
    (awq / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="quantization_config is str, not an object"):
        load_quantized_checkpoint(awq)


def test_api_loads_and_generates_an_imported_checkpoint(tmp_path, base):
    from pipeline.api import load
    path, _ = gptq_checkpoint(tmp_path / "gptq", base, 4, 32, True, False, "gptq")
    text = load(str(path)).generate("Hello", max_new_tokens=3, temperature=0)
    assert isinstance(text, str)
