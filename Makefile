# Two commands for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ebranchformer-installed
# Versions the reference specs were checked with.
TORCH_VERSION := 2.13.0
ESPNET_VERSION := 202511
RETURNN_VERSION := 1.20261022.211313

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned exactly: an unpinned torch pulls the CUDA wheels.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[all,test]" torch==$(TORCH_VERSION)
	# The reference implementations, for the parity tests. --no-deps: espnet's own pins clash with torch 2.13.
	$(PY) -m pip install -q --no-deps espnet==$(ESPNET_VERSION) returnn==$(RETURNN_VERSION)
	touch $(STAMP)

# The whole suite; fails if any parity test was skipped.
test: $(STAMP)
	EBF_REQUIRE_PARITY=1 $(PY) -m pytest -q -rs

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/ebranchformer demo

bench: $(STAMP)
	$(PY) -m ebranchformer.bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist
