"""Every CUDA source in runtime/kernels compiles with nvcc (PTX and cubin); no GPU needed.

Skipped where nvcc is not installed. The uniform and spqr kernels' names are the
ones runtime/kernels/uniform_cuda.py and spqr_cuda.py look up.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "runtime" / "kernels"
SOURCES = sorted(KERNELS.glob("*.cu"))
ARCH = "80"  # sm_80 (A100); CuPy's NVRTC compiles for the device at hand


def nvcc(source: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    return subprocess.run(["nvcc", *flags, str(source), "-o", str(out)], capture_output=True, text=True)


@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_compiles_to_ptx_and_cubin(source, tmp_path):
    ptx = nvcc(source, tmp_path / "k.ptx", "-ptx", f"-arch=compute_{ARCH}")
    assert ptx.returncode == 0, ptx.stderr
    assert ".entry" in (tmp_path / "k.ptx").read_text()
    cubin = nvcc(source, tmp_path / "k.cubin", "-cubin", f"-arch=sm_{ARCH}")
    assert cubin.returncode == 0, cubin.stderr
    assert (tmp_path / "k.cubin").stat().st_size > 0


def test_uniform_kernel_names(tmp_path):
    result = nvcc(KERNELS / "uniform.cu", tmp_path / "u.ptx", "-ptx", f"-arch=compute_{ARCH}", "-Werror",
                  "all-warnings")
    assert result.returncode == 0, result.stderr
    ptx = (tmp_path / "u.ptx").read_text()
    for bits in (2, 3, 4, 8):
        for kind in ("matvec", "dequantize"):
            assert f".entry uniform_{kind}_{bits}(" in ptx


def test_spqr_kernel_names(tmp_path):
    result = nvcc(KERNELS / "spqr.cu", tmp_path / "s.ptx", "-ptx", f"-arch=compute_{ARCH}", "-Werror",
                  "all-warnings")
    assert result.returncode == 0, result.stderr
    ptx = (tmp_path / "s.ptx").read_text()
    for bits in (2, 3, 4):
        for kind in ("matvec", "dequantize"):
            assert f".entry spqr_{kind}_{bits}(" in ptx
    assert ".entry sparse_add(" in ptx
