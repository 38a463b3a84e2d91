# Setup, demo and tests. Every target is idempotent and fast once installed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Shared benchmark data (TruthfulQA, toxicity) lives beside the checkout; override with BENCH_DATA_DIR=...
BENCH_DATA_DIR ?= $(abspath ../shared/data)
export BENCH_DATA_DIR
# torch is pinned so that this machine uses its local CPU wheel (an unpinned torch pulls a CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install models demo test lint clean-cache bench-perf

$(STAMP): pyproject.toml
	test -x $(BIN)/pip || $(PY) -m venv --clear $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

models: install
	$(BIN)/bench models pull smollm2-135m
	$(BIN)/bench models pull gemma3-270m

# The main job on the embedded default model: FLORAIN vs no intervention, TruthfulQA MC1/MC2/MC3, 2-fold CV.
DEMO_LIMIT ?= 100
demo: install
	$(BIN)/bench models pull smollm2-135m
	$(BIN)/bench run --method none --model smollm2-135m --task truthfulqa --limit $(DEMO_LIMIT)
	$(BIN)/bench run --method florain --model smollm2-135m --task truthfulqa --limit $(DEMO_LIMIT)

test: install models
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check bench florain baselines tests

clean-cache:
	rm -rf $${BENCH_CACHE_DIR:-$$HOME/.cache/bench}/activations

# Performance benchmarks (not part of make test): writes results/perf.md and results/perf.json.
PERF_ARGS ?=
bench-perf: install
	$(BIN)/bench models pull smollm2-135m
	$(BIN)/python -m bench.perf $(PERF_ARGS)
