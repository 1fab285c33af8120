"""Kernels of the packed formats: Numba CPU kernels (`<format>_numba.py`), CUDA sources
(`<format>.cu`) and their CuPy launchers (`<format>_cuda.py`, CuPy imported on first use).

Importing the package first makes Numba's cached kernels stale whenever any file of the runtime changes
(runtime/kernels/numba_cache.py): a cached kernel carries the code of the kernels it calls from other files."""
from pathlib import Path

from runtime.kernels.numba_cache import install

install(Path(__file__).resolve().parent.parent)  # the runtime package
