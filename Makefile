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

.PHONY: install models demo test test-compat lint clean-cache bench-perf reproduce-table1 regress regress-update gpu-check

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
DEMO_LIMIT ?= 40
demo: install
	$(BIN)/bench models pull smollm2-135m
	$(BIN)/bench run --method none --model smollm2-135m --task truthfulqa --limit $(DEMO_LIMIT)
	$(BIN)/bench run --method florain --model smollm2-135m --task truthfulqa --limit $(DEMO_LIMIT)

test: install models
	$(BIN)/python -m pytest -q

# The tests against the transformers release of the project's GPU machine (5.17.0), installed beside the
# virtualenv's own and put first on PYTHONPATH; the virtualenv is left unchanged. Exact pins, no dependency
# resolution: only these packages differ from the virtualenv (which has anyio, h11, idna and certifi already).
COMPAT_PACKAGES ?= transformers==5.17.0 huggingface-hub==1.33.0 httpx==0.29.0 httpcore==1.0.9
COMPAT_DIR := $(VENV)/compat
COMPAT_STAMP := $(COMPAT_DIR)/.installed-stamp
COMPAT_PATH := $(abspath $(COMPAT_DIR))$${PYTHONPATH:+:$$PYTHONPATH}
$(COMPAT_STAMP): Makefile $(STAMP)
	rm -rf $(COMPAT_DIR)
	$(BIN)/pip install -q --no-deps --target $(COMPAT_DIR) $(foreach p,$(COMPAT_PACKAGES),"$(p)")
	touch $(COMPAT_STAMP)

test-compat: install models $(COMPAT_STAMP)
	PYTHONPATH=$(COMPAT_PATH) $(BIN)/python -c \
		"import transformers; print('transformers', transformers.__version__, 'from', transformers.__file__)"
	PYTHONPATH=$(COMPAT_PATH) $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check bench florain baselines tests

clean-cache:
	rm -rf $${BENCH_CACHE_DIR:-$$HOME/.cache/bench}/activations

# GPU check on a Llama-7B-shaped model with random weights (generation, MC scoring, capture, FLORAIN fit, hook and
# bf16 checks; under 8 minutes on an H200). Needs only torch + transformers + CUDA, so no install step: it uses the
# virtualenv's python if there is one, else $(PY). Then copy $(GPU_CHECK_DIR)/gpu_check.md to results/perf-gpu.md.
# CPU smoke test of the same code path: make gpu-check GPU_CHECK_ARGS="--device cpu --tiny"
GPU_CHECK_DIR ?= results/gpu-check
GPU_CHECK_ARGS ?=
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY)) -m bench.gpu_check --out $(GPU_CHECK_DIR) $(GPU_CHECK_ARGS)

# Performance benchmarks (not part of make test): writes results/perf.md and results/perf.json.
PERF_ARGS ?=
bench-perf: install
	$(BIN)/bench models pull smollm2-135m
	$(BIN)/python -m bench.perf $(PERF_ARGS)

# The paper's Table 1 protocol (2-fold CV; none, few-shot, ITI, CAA, mean-shift, LoFiT, FLORAIN; --task truthfulqa)
# on the paper's models. Checks every model's weights first and stops at once, listing what is missing.
# On the embedded models: make reproduce-table1 MODELS="smollm2-135m gemma3-270m" LIMIT=40. Resumable.
# On a cluster: EXECUTOR=slurm EXECUTOR_CONFIG=slurm.toml (or EXECUTOR=local MAX_PARALLEL=4); see README.
MODELS ?= llama-7b llama2-chat-13b llama3-8b
LIMIT ?=
EXECUTOR ?= inline
MAX_PARALLEL ?=
EXECUTOR_CONFIG ?=
TABLE1_DIR ?= results/table1$(if $(LIMIT),-limit$(LIMIT))
reproduce-table1: install
	$(BIN)/python -m bench.reproduce table1 --models "$(MODELS)" $(if $(LIMIT),--limit $(LIMIT)) --output $(TABLE1_DIR) \
		--executor $(EXECUTOR) $(if $(MAX_PARALLEL),--max-parallel $(MAX_PARALLEL)) \
		$(if $(EXECUTOR_CONFIG),--executor-config $(EXECUTOR_CONFIG))

# Score regression check against results/regress/reference.json (a few minutes on CPU); exit 1 when a score
# moved beyond its tolerance either way (worse or better; none, which fits nothing, within float noise 1e-4).
# regress-update rewrites the reference: run it only for an intended change, after checking the differences.
regress: install
	$(BIN)/bench models pull smollm2-135m
	$(BIN)/bench regress

regress-update: install
	$(BIN)/bench models pull smollm2-135m
	$(BIN)/bench regress --update
