"""The BLAS thread defaults of runtime/__init__.py: one thread for inference, every core for the entry points
that multiply whole matrices (quantize.py, train.py), and the user's OPENBLAS_NUM_THREADS over both; the same
threads for the BLAS itself when NumPy was loaded first (as an application embedding the runtime may)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORES = str(len(os.sched_getaffinity(0)))
SHOW = "; import os; print(os.environ['OPENBLAS_NUM_THREADS'])"
LOADED = ("; import threadpoolctl; print(','.join(str(i['num_threads']) for i in threadpoolctl.threadpool_info()"
          " if i['user_api'] == 'blas'))")


def blas_threads(code: str, user_value: str | None = None, show: str = SHOW) -> str:
    """OPENBLAS_NUM_THREADS (or what `show` prints) after running `code` in a fresh interpreter in the project."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if user_value is not None:
        env["OPENBLAS_NUM_THREADS"] = user_value
    result = subprocess.run([sys.executable, "-c", code + show], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_inference_gets_one_thread():
    assert blas_threads("import pipeline.api") == "1"


@pytest.mark.parametrize("entry", ["quantize", "train"])
def test_builds_and_training_get_every_core(entry):
    assert blas_threads(f"import {entry}") == CORES


@pytest.mark.parametrize("code", ["import pipeline.api", "import quantize", "import train"])
def test_the_users_value_wins(code):
    assert blas_threads(code, user_value="3") == "3"


@pytest.mark.parametrize("code, threads", [("import numpy; import pipeline.api", "1"),
                                           ("import numpy; import train", CORES),
                                           ("import pipeline.api; import numpy", "1")])
def test_the_loaded_blas_runs_those_threads_whoever_imported_numpy_first(code, threads):
    assert blas_threads(code, show=LOADED) == threads


def test_the_users_value_wins_over_a_numpy_loaded_first():
    assert blas_threads("import numpy; import train", user_value="1", show=LOADED) == "1"
