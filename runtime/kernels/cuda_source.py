"""Compiling this folder's CUDA sources: one place that turns a .cu file and its constants into a CuPy module.

A number that Python and a kernel both use (the format's run length, a launch
shape the launcher and the kernel must agree on, a block size of the format)
is written once, in Python: each *_cuda.py module keeps its kernels' constants
in a `DEFINES` dict, passed to the compiler as -D flags (`define_flags`), and
the .cu files use the names without defining them. Device helpers that several
sources need live in one header, common.cuh, included as `#include "common.cuh"`.

CuPy compiles with NVRTC, on first use: `module` hands it the source with the
header's text in place of the include line, so CuPy's compile cache (keyed by
source text and options) sees a change of the header too. nvcc compiles the
files as they are, with -I this folder (tests/test_cuda_compile.py, no GPU
needed), from the same `define_flags`.
"""
from __future__ import annotations

from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent
HEADER = "common.cuh"
INCLUDE = f'#include "{HEADER}"'


def define_flags(defines: dict) -> tuple[str, ...]:
    """The -D flags of a module's constants: {"RUN": 32} -> ("-DRUN=32",)."""
    return tuple(f"-D{name}={int(value)}" for name, value in defines.items())


def source_text(name: str) -> str:
    """The text of the CUDA source `name` (in this folder) with common.cuh inlined at its include line."""
    text = (KERNELS_DIR / name).read_text(encoding="utf-8")
    return text.replace(INCLUDE, (KERNELS_DIR / HEADER).read_text(encoding="utf-8"))


def module(name: str, defines: dict):
    """The CuPy module of the CUDA source `name` compiled with `defines` (imports CuPy)."""
    import cupy

    return cupy.RawModule(code=source_text(name), options=define_flags(defines))
