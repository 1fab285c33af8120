"""tests/gpu_check.sh runs on a CPU-only machine to the point where it says there is no GPU (so it cannot rot)."""
import os
import subprocess

from conftest import ROOT


def test_gpu_check_reports_no_gpu_in_one_line(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no device, even on a machine that has one
    result = subprocess.run(["bash", str(ROOT / "tests" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        "gpu_check: no CUDA GPU usable through CuPy on this machine; nothing to check"]
    assert not (tmp_path / "out").exists()


def test_gpu_check_needs_an_output_directory():
    result = subprocess.run(["bash", str(ROOT / "tests" / "gpu_check.sh")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "usage" in result.stderr
