#!/usr/bin/env bash
# The GPU check in one call (issue 18): versions, every gpu-marked test, the GPU benchmark.
#
#   bash tests/gpu_check.sh DIR        (or: make gpu-check OUT=DIR)
#
# Writes DIR/versions.txt, DIR/gpu_tests.txt and .xml (pytest -m gpu), and
# DIR/bench_gpu.json and .md (bench_gpu.py). On a machine without a usable
# CUDA GPU it prints one line saying so and exits 0, so the script is tested
# by the CPU test suite between GPU runs. Installs nothing: run it where
# CuPy works (make install-gpu). BENCH_ARGS passes options to bench_gpu.py.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash tests/gpu_check.sh DIR}"
python="${PYTHON:-python3}"
if ! "$python" -c "import cupy, sys; sys.exit(cupy.cuda.runtime.getDeviceCount() < 1)" >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU usable through CuPy on this machine; nothing to check"
    exit 0
fi
mkdir -p "$out"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    nvcc --version 2>/dev/null | tail -n 2 | head -n 1
    "$python" -c "import cupy, numpy, numba, sys
print('python', sys.version.split()[0], '| cupy', cupy.__version__, '| CUDA runtime', cupy.cuda.runtime.runtimeGetVersion(),
      '| driver', cupy.cuda.runtime.driverGetVersion(), '| numpy', numpy.__version__, '| numba', numba.__version__)"
} 2>&1 | tee "$out/versions.txt"
# only the files with gpu tests: the others may need data a GPU machine lacks (../shared)
mapfile -t gpu_files < <(grep -l "mark.gpu" tests/test_*.py)
"$python" -m pytest -q -m gpu "${gpu_files[@]}" -p no:cacheprovider --junitxml="$out/gpu_tests.xml" 2>&1 |
    tee "$out/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
"$python" bench_gpu.py --out "$out" ${BENCH_ARGS:-}
bench_rc=$?
echo "gpu_check: pytest -m gpu exit $tests_rc, bench_gpu.py exit $bench_rc; results in $out"
exit $(( tests_rc != 0 || bench_rc != 0 ))
