# `make demo`: install into .venv and run the CPU reproduction; `make test`: run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) reproduce.py $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)
