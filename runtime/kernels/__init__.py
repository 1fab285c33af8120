"""Kernels of the packed formats: Numba CPU kernels (`<format>_numba.py`), CUDA sources
(`<format>.cu`) and their CuPy launchers (`<format>_cuda.py`, CuPy imported on first use)."""
