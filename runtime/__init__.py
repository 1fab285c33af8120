"""The runtime: formats and kernels, checkpoint IO, tokenizer, sampling, generation; the machinery below model.py,
the method files and pipeline/, importing none of them.

Importing it first sets two thread defaults (an environment variable already
set wins). On a small shared CPU, threads that busy-wait for work steal the
cores from the threads doing it: Numba's OpenMP workers spin after every
parallel kernel and OpenBLAS's workers after every BLAS call, and alternating
the two (as every packed matmul does) measured 5-15x slower prefill here. So
Numba's workers sleep when idle (`OMP_WAIT_POLICY=PASSIVE`) and BLAS runs on
one thread (`OPENBLAS_NUM_THREADS=1`); the Numba kernels use every core.
Both must be set before NumPy and Numba load, hence here.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
