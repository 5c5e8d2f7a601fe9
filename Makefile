# sft — `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
SFT := $(VENV)/bin/sft
# This machine has a CPU build of torch on local disk; on a GPU machine set TORCH_SPEC to your CUDA build.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help install demo test test-fast lint format bench digits clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,sweep]"
	touch $@

install: $(VENV)/.installed  ## Create .venv and install sft with everything it needs

demo: install  ## Fine-tune the embedded MiniLM on the quickstart data, then evaluate it
	$(SFT) finetune recipes/quickstart.yaml --overwrite
	$(SFT) eval recipes/quickstart.yaml

test: install  ## Run the whole test suite (unit + integration)
	$(PY) -m pytest -q

test-fast: install  ## Unit tests only
	$(PY) -m pytest -q -m "not integration"

lint: install  ## ruff lint + format check
	$(VENV)/bin/ruff check sft_cli tests benchmarks scripts
	$(VENV)/bin/ruff format --check sft_cli tests benchmarks scripts

format: install  ## Apply ruff formatting and safe fixes
	$(VENV)/bin/ruff check --fix sft_cli tests benchmarks scripts
	$(VENV)/bin/ruff format sft_cli tests benchmarks scripts

bench: install  ## Benchmark sft against the Hugging Face Trainer (writes benchmarks/RESULTS.md)
	$(PY) benchmarks/run.py

clean:  ## Remove run outputs (keeps .venv)
	rm -rf runs .pytest_cache
