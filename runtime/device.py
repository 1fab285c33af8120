"""Device selection: the array module (NumPy on the CPU, CuPy on an NVIDIA GPU).

The forward pass is written once against an array module `xp`; `--device cpu`
gives NumPy arrays (and Numba kernels inside packed formats), `--device cuda`
gives CuPy arrays (and CUDA RawKernels), so the whole pass stays on the GPU.
"""
import numpy as np

from runtime.errors import UserError

DEVICES = ("cpu", "cuda")


def array_module(device: str):
    """The array module for `device` ("cpu" -> numpy, "cuda" -> cupy)."""
    if device == "cpu":
        return np
    if device != "cuda":
        raise UserError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    try:
        import cupy
    except ImportError:
        raise UserError("--device cuda needs CuPy: run `make install-gpu` (pip install cupy-cuda12x) "
                        "on a machine with an NVIDIA GPU, or use --device cpu") from None
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CuPy raises its own CUDARuntimeError here
        raise UserError(f"--device cuda: no usable NVIDIA GPU ({err}); use --device cpu") from None
    return cupy


def is_cupy(a) -> bool:
    """True for a CuPy array (checked without importing CuPy)."""
    return type(a).__module__.split(".")[0] == "cupy"


def array_module_of(a):
    """The array module (numpy or cupy) that array `a` belongs to."""
    if is_cupy(a):
        import cupy
        return cupy
    return np


def to_numpy(a) -> np.ndarray:
    """A NumPy array of a NumPy or CuPy array (CuPy: copied to the host; NumPy: itself)."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def to_module(a, xp):
    """Array `a` on the device of array module `xp` (numpy or cupy): copied across, or itself."""
    return to_numpy(a) if xp is np else xp.asarray(a)
