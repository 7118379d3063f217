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

test: install
	$(PY) -m pytest -q

.PHONY: install demo lint test
