# xmretrieval: every target sets up .venv itself (offline-safe), so `make test` / `make reproduce`
# are the whole set-up on a fresh clone.
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# notebooks and tests run in quick mode (tiny presets); `make reproduce` in full mode unless MODE=quick
export XMR_MODE ?= quick
MODE ?= full

# pip, quiet, without the local mirror's harmless 'Location ... is ignored' warnings
PIP = $(BIN)/pip install -q 2> >(grep -v "^WARNING: Location" >&2)
STAMP := $(VENV)/.stamp-dev

.PHONY: help install test test-slow sync-check nbtest pytest reproduce docs docs-screenshots lab clean-nbs export bench system-deps

help:
	@echo "make test        full gate: notebooks clean, library in sync, nbdev_test, pytest"
	@echo "make reproduce   build the offline benchmarks, train and evaluate every model, write results/"
	@echo "make docs        build the offline documentation site into _site/"
	@echo "make lab         JupyterLab on nbs/"
	@echo "make test-slow   also the slow notebook cells and tests"
	@echo "make bench       run the benchmarks in bench/ (JSON into bench/results/)"

# Debian packages the embedded benchmark needs (emoji font, CLDR annotations). Only as root; otherwise
# xmretrieval.data raises an error naming the package to install.
system-deps:
	@if [ ! -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing fonts-noto-color-emoji unicode-cldr-core (apt)"; \
	  (apt-get install -y -q fonts-noto-color-emoji unicode-cldr-core >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q fonts-noto-color-emoji unicode-cldr-core >/dev/null 2>&1)) \
	   || echo "warning: could not install fonts-noto-color-emoji; the emoji benchmarks will ask for it"; \
	fi

$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first: the CPU wheel. Any looser spec lets pip fetch several GB of CUDA packages.
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	touch $@

install: $(STAMP) system-deps

sync-check: $(STAMP)
	$(BIN)/python tools/check_sync.py

nbtest: $(STAMP) system-deps
	$(BIN)/nbdev_test --n_workers 2 --timing

pytest: $(STAMP) system-deps
	$(BIN)/python -m pytest -q tests

# The gate CI runs. pytest last, so its summary line closes the run.
test: $(STAMP) system-deps
	$(BIN)/python tools/check_sync.py
	# one thread per notebook worker: two workers on two cores, no oversubscription
	OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2
	$(BIN)/python -m pytest -q tests

# the slow notebook cells and tests, skipped by `make test`
test-slow: $(STAMP) system-deps
	$(BIN)/nbdev_test --n_workers 2 --flags slow
	$(BIN)/python -m pytest -q --runslow tests

# WORKERS: training processes, one torch thread each (default: every core)
reproduce: $(STAMP) system-deps
	$(BIN)/python -m xmretrieval.reproduce --mode $(MODE) --out results $(if $(WORKERS),--workers $(WORKERS))

docs: $(STAMP)
	$(BIN)/python tools/build_docs.py

docs-screenshots: docs
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ]; then apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null); fi
	$(BIN)/python tools/screenshots.py

lab: $(STAMP)
	$(BIN)/jupyter lab nbs

export: $(STAMP)
	$(BIN)/nbdev_export

clean-nbs: $(STAMP)
	$(BIN)/nbdev_clean

bench: $(STAMP) system-deps
	$(BIN)/python bench/run_all.py
