# Set-up, tests and benchmarks. `make install` then `python run.py "prompt"`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: install install-test install-gpu test test-gpu gpu-check fuzz bench

install:  ## run-time dependencies + the default model (models/smollm2-135m)
	$(PIP) -r requirements.txt
	$(PYTHON) -m runtime.hub.fetch

install-test:  ## test-only oracles: pytest, CPU torch, transformers, ml_dtypes, peft
	$(PIP) -r requirements-test.txt

install-gpu:  ## CuPy for --device cuda: nothing when `import cupy` works, else the wheel of nvcc's CUDA major
	@$(PYTHON) -c "import cupy" 2>/dev/null || { \
	  major=$$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\..*/\1/p'); \
	  [ -n "$$major" ] || major=$$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\)\..*/\1/p'); \
	  [ -n "$$major" ] || { echo "install-gpu: neither nvcc nor nvidia-smi found: no CUDA here"; exit 1; }; \
	  $(PIP) "cupy-cuda$${major}x==14.2.0"; }

test: install-test
	$(PYTHON) -m pytest -q -m "not gpu" tests

test-gpu: install-gpu  ## the GPU tests need pytest and CuPy only (installed when missing)
	@$(PYTHON) -c "import pytest" 2>/dev/null || $(PIP) pytest==9.2.0
	$(PYTHON) -m pytest -q -m gpu tests

gpu-check:  ## versions, GPU tests and bench_gpu.py in one call: make gpu-check OUT=DIR
	bash tests/gpu_check.sh $(or $(OUT),gpu-check)

fuzz: install-test  ## the fuzz test of damaged model files, 1000 cases per target instead of 60
	FUZZ_CASES=1000 $(PYTHON) -m pytest -q -s tests/test_fuzz.py

bench:  ## writes BENCHMARKS.md, benchmarks.png and the README's tables; a subset: make bench BENCH_ARGS="--rows 'tinyllama*' --rounds 1"
	CMAKE_ARGS="$$($(PYTHON) bench_llamacpp.py cmake-args)" $(PIP) -r requirements-bench.txt
	$(PYTHON) bench.py $(BENCH_ARGS)
