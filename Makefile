# `make demo`, `make lint` and `make test` work on a fresh machine: they create .venv and install into it first
# (one install, with the test and lint extras, serves all three).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,lint]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/contrastive-train

# ruff and mypy read their settings (and what to check) from pyproject.toml
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# two workers of one torch thread each use the 2 cores better than one process of two threads (CLI subprocesses
# inherit OMP_NUM_THREADS); worksteal balances the slow end-to-end tests between them
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal

.PHONY: install demo lint test
