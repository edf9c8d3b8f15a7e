# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv when it is missing and installs what it needs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint unit bench clean browser dist docs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is pinned and installed on its own first so that pip takes the CPU build on disk
# instead of resolving a CUDA build for the reference-implementation tests.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,study]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m clipchain study

# The study's report is checked in a real headless browser: Debian's Chromium and its driver.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

lint: $(STAMP)
	$(VENV)/bin/ruff check clipchain tests benchmarks examples mkdocs_hooks.py
	$(VENV)/bin/ruff format --check clipchain tests benchmarks examples mkdocs_hooks.py
	$(VENV)/bin/mypy

unit: $(STAMP) browser
	$(PY) -m pytest -n auto clipchain tests

test: lint unit

# A wheel and an sdist in dist/, checked by twine.
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --no-isolation --outdir dist .
	$(PY) -m twine check --strict dist/*

# The documentation site in site/, with warnings as errors (the tests build it too).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(PY) benchmarks/clip_step.py

clean:
	rm -rf $(VENV) reports dist build site
