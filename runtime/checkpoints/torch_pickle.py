"""Read a PyTorch `pytorch_model.bin` state dict without PyTorch, and without running its pickle.

Follows the zip-based format that `torch.save` writes since PyTorch 1.6
(torch/serialization.py, `_save` / `_load`):

    <top>/data.pkl        pickle (protocol 2) of the state dict; each tensor is
                          torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                          with `storage` a persistent id
                          ("storage", torch.<Type>Storage, key, location, numel)
    <top>/data/<key>      raw little-endian bytes of storage `key`
    <top>/byteorder       "little" or "big" (absent in old files: little)

`<top>` is "archive" or whatever name the file had when saved. A pickle can
call any importable function, so the unpickler here resolves only the handful
of names a state dict needs, to our own NumPy stand-ins, and raises UserError
for anything else (torch's own `weights_only=True` loader takes the same
approach). A zip member cannot be memory-mapped, so each storage is read into
memory once; tensors are strided views into it, bounds-checked first.
"""
from __future__ import annotations

import collections
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

from runtime.errors import UserError
from runtime.checkpoints.safetensors_io import bf16_to_float32, corrupt

# torch storage class name -> NumPy dtype of its elements (BFloat16 read as raw bits).
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("f8"),
    "FloatStorage": np.dtype("f4"),
    "HalfStorage": np.dtype("f2"),
    "BFloat16Storage": np.dtype("u2"),
    "LongStorage": np.dtype("i8"),
    "IntStorage": np.dtype("i4"),
    "ShortStorage": np.dtype("i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class StorageType:
    """Stand-in for a torch.<Type>Storage class named in a persistent id: just its dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class Storage:
    """A storage read from the zip: a flat array of its elements and its dtype name."""

    def __init__(self, data: np.ndarray, type_name: str):
        self.data = data  # [numel]
        self.type_name = type_name


def rebuild_tensor(storage: Storage, offset: int, size: tuple, stride: tuple, *_ignored) -> np.ndarray:
    """Stand-in for torch._utils._rebuild_tensor_v2: a strided view into the storage.

    The remaining arguments (requires_grad, backward hooks, metadata) do not
    matter for inference and are ignored.
    """
    if not isinstance(storage, Storage):
        raise UserError("refusing to load pytorch_model.bin: a tensor is not backed by a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
        raise UserError(f"pytorch_model.bin holds a tensor with bad size {size} / stride {stride}; re-save it")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.data.size:
        raise UserError(f"pytorch_model.bin holds a tensor reaching element {last} of a "
                        f"{storage.data.size}-element storage; the file is corrupt, re-download it")
    itemsize = storage.data.itemsize
    view = np.lib.stride_tricks.as_strided(storage.data[offset:], shape=size,
                                           strides=tuple(s * itemsize for s in stride), writeable=False)
    return bf16_to_float32(view) if storage.type_name == "BFloat16Storage" else view


def rebuild_parameter(data: np.ndarray, *_ignored) -> np.ndarray:
    """Stand-in for torch._utils._rebuild_parameter: a Parameter is just its tensor here."""
    return data


# (module, name) a state-dict pickle may reference -> what it resolves to here.
ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): StorageType(name) for name in STORAGE_DTYPES},
}


class StateDictUnpickler(pickle.Unpickler):
    """An unpickler that only builds tensors, reading storages from the zip archive."""

    def __init__(self, file, archive: zipfile.ZipFile, top: str, byteorder: str, path: Path):
        super().__init__(file)
        self.archive, self.top, self.byteorder, self.path = archive, top, byteorder, path
        self.storages: dict[str, Storage] = {}

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise UserError(f"refusing to load {module}.{name} from {self.path}: only tensors are allowed (a pickle "
                            f"can run code); if you trust its source, re-save it as safetensors")
        return ALLOWED_GLOBALS[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], StorageType) and isinstance(pid[2], str)):
            raise UserError(f"refusing to load persistent object {pid!r:.80} from {self.path}: "
                            "only tensors are allowed; if you trust its source, re-save it as safetensors")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if key not in self.storages:
            member = f"{self.top}/data/{key}"
            try:
                raw = self.archive.read(member)
            except KeyError:
                raise corrupt(self.path, f"storage {member} is missing") from None
            dtype = storage_type.dtype.newbyteorder("<" if self.byteorder == "little" else ">")
            if len(raw) != numel * dtype.itemsize:
                raise corrupt(self.path, f"storage {member} has {len(raw)} bytes, expected {numel * dtype.itemsize}")
            data = np.frombuffer(raw, dtype=dtype)  # [numel]
            self.storages[key] = Storage(data.astype(dtype.newbyteorder("="), copy=False), storage_type.name)
        return self.storages[key]


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a `torch.save(state_dict)` zip file as {name: read-only NumPy array}.

    Tensors keep their stored dtype (float16 stays float16), except bfloat16,
    which comes back as float32. Views of one storage (a transpose, a slice,
    tied weights) come back as views of one buffer. Raises UserError for a
    pickle that names anything but tensors, and for truncated or corrupt files.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; check the model path or rebuild/re-download it")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a zip-format PyTorch checkpoint (saved before PyTorch 1.6, "
                        "or corrupt); re-save it with a newer torch or convert it to safetensors")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
            if len(pickles) != 1:
                raise corrupt(path, f"expected one <folder>/data.pkl in the archive, found {len(pickles)}")
            top = pickles[0].split("/")[0]
            names = set(archive.namelist())
            byteorder = archive.read(f"{top}/byteorder").decode() if f"{top}/byteorder" in names else "little"
            with archive.open(pickles[0]) as f:
                state = StateDictUnpickler(f, archive, top, byteorder, path).load()
    except UserError:
        raise
    except Exception as e:  # a damaged zip or pickle fails in many ways; all mean the same to the user
        raise corrupt(path, f"{type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors; save model.state_dict(), not the model")
    return dict(state)
