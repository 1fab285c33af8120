"""The LoRA training backward pass (pipeline/training/backward.py) against PEFT + torch autograd.

Oracle: a tiny random HF Llama (GQA: 4 heads, 2 kv heads; tied and untied LM
head) or OPT (pre-LN and post-LN, with and without project_in/out; random
LayerNorms and biases) wrapped by PEFT with LoRA on every projection and
random lora_B; the loss of one batch with masked labels and the gradients
torch autograd gives lora_A and lora_B must equal ours within 1e-4 relative.
With a packed base (NF4 with double quantization, uniform 4-bit, QuIP#'s E8P)
the oracle runs on the dequantized weights, which is what QLoRA differentiates.
Two layers: the first is recomputed in the backward (its output projections'
products skipped), the last keeps its activations from the forward.
"""
import shutil

import numpy as np
import pytest

from conftest import DATA, save_tiny_llama

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import nf4  # noqa: E402
import quipsharp  # noqa: E402
import rtn  # noqa: E402
from model import Config, Model  # noqa: E402
from runtime.checkpoints.checkpoint import load_checkpoint  # noqa: E402
from pipeline.training import backward  # noqa: E402
from pipeline.training.backward import IGNORE, Adapter, Pass  # noqa: E402

TOLERANCE = 1e-4


@pytest.fixture(autouse=True, params=[None, 5], ids=["one-block", "blocks-of-5"])
def query_block(request, monkeypatch):
    """Every test twice: with the attention's query blocks as run (one block covers these short windows) and
    with blocks of 5 rows, so that the blocked causal products (a last block shorter than the others
    included) meet the oracle too."""
    if request.param is not None:
        monkeypatch.setattr(backward, "QUERY_BLOCK", request.param)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.1)
OPT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
OPT_TINY = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=50272,
                max_position_embeddings=32, word_embed_proj_dim=64, init_std=0.1, dropout=0.0,
                bos_token_id=2, eos_token_id=2, pad_token_id=1)
OPT_CASES = {"opt-pre-ln": (dict(), None), "opt-post-ln": (dict(do_layer_norm_before=False), None),
             "opt-project-in-out": (dict(do_layer_norm_before=False, word_embed_proj_dim=32), None),
             "opt-pre-ln-rtn4": (dict(), "rtn4"),
             "opt-project-in-out-nf4dq": (dict(word_embed_proj_dim=32), "nf4dq"),
             "opt-post-ln-e8p": (dict(do_layer_norm_before=False), "e8p")}


def quantizer(kind):
    return {"nf4dq": lambda W: nf4.quantize(W, nf4.NF4Params(double_quant=True)),
            "rtn4": lambda W: rtn.quantize(W, rtn.RTNParams(bits=4, group_size=32)),
            "e8p": lambda W: quipsharp.quantize(W, np.eye(W.shape[1], dtype=np.float32))[0]}[kind]


def save_tiny_opt(path, **overrides):
    """Save a random tiny HF OPT with the GPT-2 byte-level BPE files (vocab.json + merges.txt); return the model.

    Its LayerNorm weights and all biases are drawn at random too (HF starts them at 1 and 0), so that a
    backward step that forgot one of them would show."""
    import transformers

    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(**dict(OPT_TINY, **overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "layer_norm" in name:
                p.add_(torch.randn(p.shape) * 0.2)
    model.save_pretrained(path)
    shutil.copy(DATA / "tokenizers" / "gpt2" / "encoder.json", path / "vocab.json")
    shutil.copy(DATA / "tokenizers" / "gpt2" / "vocab.bpe", path / "merges.txt")
    return model


def peft_case(tmp_path, tied: bool, packed: str | None):
    """(our Model, our Adapter, PEFT model) of a tiny Llama: the same base weights (dequantized when packed)
    and factors."""
    return wrap(tmp_path, save_tiny_llama(tmp_path, tie_word_embeddings=tied, **TINY), TARGETS, packed)


def wrap(tmp_path, hf, targets: list, packed: str | None):
    """(our Model, our Adapter, PEFT model) of the HF model saved in tmp_path, LoRA on `targets`."""
    config, tensors = load_checkpoint(tmp_path)
    if packed is not None:
        state = hf.state_dict()
        for name in list(tensors):
            if name.endswith(tuple(f".{t}.weight" for t in targets)):
                tensors[name] = quantizer(packed)(tensors[name])
                W = tensors[name].dequantize()  # [out, in]: what training multiplies by
                x = np.random.default_rng(3).standard_normal((24, W.shape[1])).astype(np.float32)  # [24, in]
                y = x @ W.T  # [24, out] run time must compute this too, within its integer kernels' rounding
                assert np.abs(tensors[name].matmul(x) - y).max() < 1e-3 * np.abs(y).max()
                state[name].copy_(torch.from_numpy(W))
    model = Model(Config.from_hf(config), tensors)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                         lora_dropout=0.0))
    generator = torch.Generator().manual_seed(2)
    A, B = {}, {}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            key = name.removeprefix("base_model.model.").replace(".lora_A.default", "").replace(
                ".lora_B.default", "")
            (A if "lora_A" in name else B)[key] = p.detach().numpy().copy()
    return model, Adapter(A, B, rank=4, alpha=8.0, targets=targets), peft_model


def batch():
    """ids [2, 12] and HF labels with the first 4 tokens of row 0 and the last 3 of row 1 masked."""
    ids = np.random.default_rng(1).integers(3, 32000, (2, 12))
    labels = ids.copy()
    labels[0, :4] = IGNORE
    labels[1, -3:] = IGNORE
    return ids, labels


def relative(ours, theirs) -> float:
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


@pytest.mark.parametrize("tied,packed", [(True, None), (False, None), (True, "nf4dq"), (False, "rtn4"),
                                                (True, "e8p")],
                         ids=["tied", "untied", "nf4dq", "rtn4-untied", "e8p"])
def test_loss_and_lora_gradients_match_peft_autograd(tmp_path, tied, packed):
    assert_matches_peft(*peft_case(tmp_path, tied, packed), 2 * 7 * 2)


@pytest.mark.parametrize("case", sorted(OPT_CASES))
def test_opt_loss_and_lora_gradients_match_peft_autograd(tmp_path, case):
    overrides, packed = OPT_CASES[case]
    model, adapter, peft_model = wrap(tmp_path, save_tiny_opt(tmp_path, **overrides), OPT_TARGETS, packed)
    assert ("project_in.weight" in model.globals) == ("word_embed_proj_dim" in overrides)
    assert ("final_layer_norm.weight" in model.globals) == model.config.pre_norm
    assert_matches_peft(model, adapter, peft_model, 2 * 6 * 2)


def assert_matches_peft(model, adapter, peft_model, n_factors: int):
    """Our loss and LoRA gradients of one masked batch equal PEFT + torch autograd's, all n_factors of them."""
    ids, labels = batch()
    loss = peft_model(input_ids=torch.tensor(ids), labels=torch.tensor(labels)).loss
    loss.backward()
    targets = np.concatenate([labels[:, 1:], np.full((2, 1), IGNORE)], axis=1)  # HF shifts labels left
    step = Pass(model, adapter)
    total, count = step.run(ids, targets)
    assert count == (labels[:, 1:] != IGNORE).sum()
    assert abs(total / count - loss.item()) < TOLERANCE * abs(loss.item())
    checked = 0
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            key = name.removeprefix("base_model.model.").replace(".lora_A.default", "").replace(
                ".lora_B.default", "")
            ours = (step.grads_A if "lora_A" in name else step.grads_B)[key] / count
            assert relative(ours, p.grad.numpy()) < TOLERANCE, name
            checked += 1
    assert checked == n_factors


def test_masked_tokens_add_nothing(tmp_path):
    """Masking: the loss and gradients of the response targets are those of all targets minus those of the
    prompt targets, so a masked (prompt) token contributes exactly nothing."""
    model, adapter, _ = peft_case(tmp_path, True, None)
    ids, _ = batch()
    everything = np.concatenate([ids[:, 1:], np.full((2, 1), IGNORE)], axis=1)  # [2, 12]
    prompt, response = everything.copy(), everything.copy()
    prompt[:, 5:] = IGNORE
    response[:, :5] = IGNORE
    runs = [Pass(model, adapter) for _ in range(3)]
    (all_loss, all_count), (p_loss, p_count), (r_loss, r_count) = (
        run.run(ids, t) for run, t in zip(runs, (everything, prompt, response)))
    assert r_count == all_count - p_count == 2 * 6
    assert abs(r_loss - (all_loss - p_loss)) < TOLERANCE * all_loss
    for name in adapter.names():
        for grads in ("grads_A", "grads_B"):
            whole, part, rest = (getattr(run, grads)[name] for run in runs)
            assert relative(rest, whole - part) < TOLERANCE, name


def test_lora_dropout_branch_matches_autograd(tmp_path):
    """y = x Wᵀ + s (m ⊙ x) Aᵀ Bᵀ with an inverted-dropout mask m: dx, dA, dB equal torch autograd, and the
    recomputation of the layer (activation checkpointing) draws the same mask."""
    model, adapter, _ = peft_case(tmp_path, True, None)
    w = {"mlp.up_proj.weight": np.asarray(model.layers[0]["mlp.up_proj.weight"])}  # [128, 64]
    name = "model.layers.0.mlp.up_proj.weight"
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)  # [B, T, in]
    dy = rng.standard_normal((2, 5, 128)).astype(np.float32)  # [B, T, out]
    step, kept, again = Pass(model, adapter, dropout=0.3, seed=5), {}, {}
    y = step.project(0, w, "mlp.up_proj", x, kept)  # [B, T, out]
    step.project(0, w, "mlp.up_proj", x, again)
    mask = kept["mlp.up_proj"][0]  # [B, T, in]
    assert np.array_equal(mask, again["mlp.up_proj"][0]) and 0.5 < (mask == 0).mean() / 0.3 < 1.5
    dx = step.project_backward(0, w, "mlp.up_proj", dy, kept)  # [B, T, in]
    tx, tA, tB = (torch.tensor(a, requires_grad=True) for a in (x, adapter.A[name], adapter.B[name]))
    ty = tx @ torch.from_numpy(w["mlp.up_proj.weight"]).T + 2.0 * ((tx * torch.from_numpy(mask)) @ tA.T) @ tB.T
    (ty * torch.from_numpy(dy)).sum().backward()
    assert relative(y, ty.detach().numpy()) < 1e-6
    for ours, theirs in ((dx, tx), (step.grads_A[name], tA), (step.grads_B[name], tB)):
        assert relative(ours, theirs.grad.numpy()) < TOLERANCE
