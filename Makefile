# Fresh machine: `make demo` (installs, then runs the SafetyWorld pipeline) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error
export TOKENIZERS_PARALLELISM ?= false

# TRL 0.24 (the last TRL with PPOTrainer) in its own venv, for `make throughput` only; torch first, pinned, as above.
BENCH_VENV ?= .bench-venv

.PHONY: install demo test test-fast lint benchmark robustness throughput clean

INSTALL_LOG ?= $(VENV)-install.log

# pip's output goes to $(INSTALL_LOG) (one line on the terminal); on failure its last lines are printed.
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	@echo "installing into $(VENV) (torch==$(TORCH_VERSION) first; full log: $(INSTALL_LOG))"
	@( set -e; \
	  $(PYTHON) -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip; \
	  $(PY) -m pip install -q torch==$(TORCH_VERSION); \
	  $(PY) -m pip install -q -e ".[dev]" ) > $(INSTALL_LOG) 2>&1 \
	  || { echo "install failed; last lines of $(INSTALL_LOG):"; tail -n 30 $(INSTALL_LOG); exit 1; }
	@touch $@

install: $(VENV)/.installed

# `make demo DEMO_ARGS=--resume` continues an interrupted demo at the stage it stopped in.
DEMO_ARGS ?=
demo: install
	$(PY) -m repo_lightning.pipeline --root lightning_logs/demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow and not distributed"

lint: install
	$(VENV)/bin/ruff check repo_lightning tests benchmarks

# ROBUSTNESS_ARGS e.g. "--oracle-scores --out lightning_logs/ceiling" (the ceiling check, docs/algorithm.md 13).
robustness: install
	$(PY) benchmarks/demo_robustness.py --out lightning_logs/robustness $(ROBUSTNESS_ARGS)

benchmark: install
	$(PY) -m benchmarks.safety_compensation

$(BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(BENCH_VENV)/bin/python -m pip install -q trl==0.24.0 "transformers<5" accelerate
	touch $@

# Side by side with TRL's PPOTrainer (docs/performance.md); THROUGHPUT_ARGS e.g. "--workloads W1 --reps 3".
throughput: install $(BENCH_VENV)/.installed
	$(PY) benchmarks/throughput.py --trl-python $(BENCH_VENV)/bin/python $(THROUGHPUT_ARGS)

clean:
	rm -rf lightning_logs/demo .cache
