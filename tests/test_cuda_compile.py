"""Every CUDA source in runtime/kernels compiles with nvcc (PTX and cubin); no GPU needed.

Each source is compiled as CuPy compiles it: with the -D defines of its
launcher module's DEFINES (runtime/kernels/cuda_source.py) and the shared
header common.cuh, found through -I (nvcc) or inlined (`source_text`, what
NVRTC gets). Skipped where nvcc is not installed. The uniform and spqr
kernels' names are the ones their launchers look up.
"""
import importlib
import shutil
import subprocess
from pathlib import Path

import pytest

from runtime.kernels import cuda_source

KERNELS = cuda_source.KERNELS_DIR
SOURCES = sorted(KERNELS.glob("*.cu"))
ARCH = "80"  # sm_80 (A100); CuPy's NVRTC compiles for the device at hand


def launcher(source: Path):
    """The *_cuda.py module that compiles `source`."""
    module = importlib.import_module(f"runtime.kernels.{source.stem}_cuda")
    assert module.SOURCE == source.name
    return module


def nvcc(source: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    defines = cuda_source.define_flags(launcher(source).DEFINES)
    return subprocess.run(["nvcc", *defines, f"-I{KERNELS}", *flags, str(source), "-o", str(out)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_compiles_to_ptx_and_cubin(source, tmp_path):
    ptx = nvcc(source, tmp_path / "k.ptx", "-ptx", f"-arch=compute_{ARCH}", "-Werror", "all-warnings")
    assert ptx.returncode == 0, ptx.stderr
    assert ".entry" in (tmp_path / "k.ptx").read_text()
    cubin = nvcc(source, tmp_path / "k.cubin", "-cubin", f"-arch=sm_{ARCH}")
    assert cubin.returncode == 0, cubin.stderr
    assert (tmp_path / "k.cubin").stat().st_size > 0


@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_inlined_source_compiles_without_the_include_path(source, tmp_path):
    """What NVRTC gets (`source_text`: common.cuh inlined) compiles with the defines alone, and no constant a
    launcher passes is also #defined in the source (one place for each number)."""
    text = cuda_source.source_text(source.name)
    assert cuda_source.INCLUDE not in text
    for name in launcher(source).DEFINES:
        assert f"#define {name} " not in text, f"{source.name} defines {name}, which its launcher passes"
    inlined = tmp_path / source.name
    inlined.write_text(text)
    ptx = nvcc(inlined, tmp_path / "k.ptx", "-ptx", f"-arch=compute_{ARCH}")
    assert ptx.returncode == 0, ptx.stderr


def test_a_missing_define_fails_to_compile(tmp_path):
    """The sources really read their constants from the defines: without them uniform.cu does not compile."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    result = subprocess.run(["nvcc", f"-I{KERNELS}", "-ptx", f"-arch=compute_{ARCH}", str(KERNELS / "uniform.cu"),
                             "-o", str(tmp_path / "u.ptx")], capture_output=True, text=True)
    assert result.returncode != 0 and "RUN" in result.stderr


def test_uniform_kernel_names(tmp_path):
    result = nvcc(KERNELS / "uniform.cu", tmp_path / "u.ptx", "-ptx", f"-arch=compute_{ARCH}", "-Werror",
                  "all-warnings")
    assert result.returncode == 0, result.stderr
    ptx = (tmp_path / "u.ptx").read_text()
    from runtime.kernels.uniform_cuda import KERNEL_ROWS
    for bits in (2, 3, 4, 8):
        assert f".entry uniform_dequantize_{bits}(" in ptx
        for rows in KERNEL_ROWS:
            for vec in (1, 4):
                assert f".entry uniform_matvec_{bits}_r{rows}_v{vec}(" in ptx


def test_spqr_kernel_names(tmp_path):
    result = nvcc(KERNELS / "spqr.cu", tmp_path / "s.ptx", "-ptx", f"-arch=compute_{ARCH}", "-Werror",
                  "all-warnings")
    assert result.returncode == 0, result.stderr
    ptx = (tmp_path / "s.ptx").read_text()
    for bits in (2, 3, 4):
        for kind in ("matvec", "dequantize"):
            assert f".entry spqr_{kind}_{bits}(" in ptx
    sparse = nvcc(KERNELS / "sparse.cu", tmp_path / "c.ptx", "-ptx", f"-arch=compute_{ARCH}")
    assert sparse.returncode == 0 and ".entry sparse_add(" in (tmp_path / "c.ptx").read_text()
