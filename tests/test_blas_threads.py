"""The process defaults of runtime/__init__.py. BLAS threads: one thread for inference, every core for the entry
points that multiply whole matrices (quantize.py, train.py), and the user's OPENBLAS_NUM_THREADS over both; the
same threads for the BLAS itself when NumPy was loaded first (as an application embedding the runtime may).
Freed memory: after importing the runtime, freed temporaries of megabytes are reused without page faults,
unless the user tuned glibc's malloc."""
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


TEMPORARIES = ("; import resource, numpy as np; np.ones(786432, np.float32)"
               "; before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt"
               "; [sum(a.sum() for a in [np.ones(786432, np.float32) for _ in range(4)]) for _ in range(20)]"
               "; print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")


def page_faults(code: str, **env: str) -> int:
    """Minor page faults of TEMPORARIES after running `code` in a fresh interpreter, with `env` added."""
    result = subprocess.run([sys.executable, "-c", code + TEMPORARIES], cwd=ROOT, env={**os.environ, **env},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_runtime_reuses_freed_temporaries_without_page_faults():
    """20 rounds of four live temporaries of 3 MB (768 pages each), as a NumPy expression over [512, 1536]
    arrays makes: by default the heap's top is handed back after each round and faulted in again (about 60,000
    faults measured); once the runtime is imported only the heap's first growth faults."""
    assert page_faults("import numpy") > 10 * 4 * 768
    for code in ("import pipeline.api", "import train", "import numpy; import runtime"):
        assert page_faults(code) < 4 * 1000, code


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_the_users_malloc_tuning_wins(env):
    assert page_faults("import pipeline.api", **env) > 10 * 4 * 768
