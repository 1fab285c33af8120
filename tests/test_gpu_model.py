"""The whole forward pass on CuPy arrays (`--device cuda`) against the NumPy pass; skipped without a GPU."""
import numpy as np
import pytest

from conftest import STORIES260K
from model import Config, Model
from runtime.checkpoint import load_checkpoint

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("tag", [None, "rtn4g128", "int8"])  # nf4 needs in % 64 == 0; stories260K has 172
def test_cuda_forward_matches_cpu(cupy, tag):
    from runtime.quantize_model import quantize_tensors
    from runtime.tags import parse_tag
    config, tensors = load_checkpoint(STORIES260K)
    cfg = Config.from_hf(config)
    if tag:
        spec = parse_tag(tag)
        spec.group_size = 32 if tag.startswith("rtn") else spec.group_size  # stories260K: 64 inputs per row
        tensors = quantize_tensors(cfg, tensors, spec, progress=False)
    ids = [1, 403, 407, 261, 378, 401, 300, 12]
    cpu, gpu = Model(cfg, tensors), Model(cfg, tensors, cupy)
    a = cpu.prefill(ids[:6], cpu.new_cache(16), all_logits=True)  # [6, vocab]
    b = gpu.prefill(ids[:6], gpu.new_cache(16), all_logits=True).get()  # [6, vocab]
    assert np.abs(a - b).max() < 1e-3 * np.abs(a).max()
    cache_a, cache_b = cpu.new_cache(16), gpu.new_cache(16)
    cpu.prefill(ids[:6], cache_a)
    gpu.prefill(ids[:6], cache_b)
    for token in ids[6:]:
        assert np.abs(cpu.decode(token, cache_a) - gpu.decode(token, cache_b).get()).max() < 1e-3 * np.abs(a).max()
