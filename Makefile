# Newcomer entry points (see README.md). `make demo` and `make test` create the venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m llavaction_jax demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m llavaction_jax.bench.forward

clean:
	rm -rf $(VENV) .pytest_cache
