"""Tests for runtime.checkpoints.torch_pickle against files written by torch.save."""
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from runtime.errors import UserError
from runtime.checkpoints.torch_pickle import Storage, load_torch_state_dict, rebuild_tensor


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """What the loader should return for a torch tensor: same dtype, bfloat16 widened to float32."""
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def assert_same(loaded: dict, state: dict) -> None:
    assert loaded.keys() == state.keys()
    for name, t in state.items():
        expected = as_numpy(t)
        assert loaded[name].dtype == expected.dtype, name
        assert loaded[name].shape == expected.shape and np.array_equal(loaded[name], expected), name


def test_dtypes_and_views(tmp_path):
    torch.manual_seed(0)
    base = torch.randn(6, 4)
    state = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "f64": torch.randn(2).double(),
        "i64": torch.arange(5),
        "i32": torch.arange(4, dtype=torch.int32),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(7, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "transposed": base.t(),  # strides (1, 4) into a shared storage
        "slice": base[2:5, 1:3],  # storage offset 9, non-contiguous
        "tied": base,  # the same storage as the two views above
        "scalar": torch.tensor(1.5),
        "parameter": torch.nn.Parameter(torch.ones(3)),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "weights.bin"  # the archive's top folder is then "weights", not "archive"
    torch.save(state, path)
    loaded = load_torch_state_dict(path)
    assert_same(loaded, state)
    assert all(not a.flags.writeable for name, a in loaded.items() if name != "bf16")  # views, not copies
    assert np.shares_memory(loaded["transposed"], loaded["tied"])


def test_real_state_dict(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    path = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), path)
    assert_same(load_torch_state_dict(path), model.state_dict())


class Reduce:
    """Pickles to a call of `function(*args)`: what a malicious checkpoint holds."""

    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("attack", ["os_system", "load_from_bytes", "builtins_eval"])
def test_malicious_pickles_are_refused(tmp_path, attack):
    marker = tmp_path / "pwned"
    if attack == "os_system":
        payload = pickle.dumps({"w": Reduce(os.system, (f"touch {marker}",))}, protocol=2)
    elif attack == "load_from_bytes":  # torch's legacy path, which runs torch.load on inner bytes
        buffer = io.BytesIO()
        torch.save(torch.zeros(2), buffer, _use_new_zipfile_serialization=False)
        payload = pickle.dumps({"w": Reduce(torch.storage._load_from_bytes, (buffer.getvalue(),))}, protocol=2)
    else:
        payload = pickle.dumps(Reduce(eval, (f"__import__('os').system('touch {marker}')",)), protocol=2)
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
    with pytest.raises(UserError, match="refusing to load .* only tensors are allowed"):
        load_torch_state_dict(path)
    assert not marker.exists()


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(UserError, match="state dict"):
        load_torch_state_dict(path)


def test_truncated_and_damaged_files(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(100, 10)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="truncated or corrupt|not a zip-format"):
        load_torch_state_dict(path)

    with zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w") as out:
        with zipfile.ZipFile(io.BytesIO(raw)) as original:
            for item in original.infolist():
                data = original.read(item)
                out.writestr(item, data[:-8] if item.filename.endswith("data/0") else data)
    with pytest.raises(UserError, match="storage .* has 3992 bytes, expected 4000"):
        load_torch_state_dict(path)


def test_out_of_bounds_view_is_refused():
    storage = Storage(np.zeros(10, np.float32), "FloatStorage")
    assert rebuild_tensor(storage, 2, (2, 4), (4, 1)).shape == (2, 4)  # elements 2..9: fits
    with pytest.raises(UserError, match="reaching element 10"):
        rebuild_tensor(storage, 3, (2, 4), (4, 1))
