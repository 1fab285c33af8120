# Set-up, tests and benchmarks. `make install` then `python run.py "prompt"`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: install install-test install-gpu test test-gpu bench

install:  ## run-time dependencies + the default model (models/smollm2-135m)
	$(PIP) -r requirements.txt
	$(PYTHON) -m runtime.fetch

install-test:  ## test-only oracles: pytest, CPU torch, transformers, ml_dtypes, peft
	$(PIP) -r requirements-test.txt

install-gpu:  ## CuPy for --device cuda (on a machine with an NVIDIA GPU)
	$(PIP) cupy-cuda12x==14.2.0

test: install-test
	$(PYTHON) -m pytest -q -m "not gpu" tests

test-gpu: install-test install-gpu
	$(PYTHON) -m pytest -q -m gpu tests

bench:  ## writes BENCHMARKS.md and benchmarks.png
	$(PIP) -r requirements-bench.txt
	$(PYTHON) bench.py
