# `make train` and `make test` set everything up from nothing: a virtual environment with the
# project and its dev extra installed. The stamp file is rewritten only after a complete install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
ARGS ?=
# Test files run on this many pytest-xdist workers (most tests start one or two CPU processes).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

BENCH_ARGS ?= --processes 1,2 --time-to-quality

.PHONY: install system-packages train test test-quick bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Slurm, munge and shellcheck for the template tests (apt-get, as root; see the script).
system-packages:
	bash tests/helpers/system_packages.sh

train: $(STAMP)
	$(PY) -m train --config $(CONFIG) $(ARGS)

test: $(STAMP) system-packages
	$(PYTEST)

test-quick: $(STAMP)
	$(PYTEST) -m "not slow"

bench: $(STAMP)
	$(PY) -m benchmarks.bench $(BENCH_ARGS) --out bench.json

clean:
	rm -rf runs .pytest_cache
