# `make demo` and `make test` work on a fresh machine: they create .venv and install into it first.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/contrastive-train

test: install
	$(PY) -m pytest -q

.PHONY: install demo test
