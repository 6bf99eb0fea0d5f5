# Bastion: one-command set-up, demo and tests on a fresh Debian with Python 3.11.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: demo test lint bench clean venv

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Bastion needs Python 3.11+"'
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3-venv is missing; installing it (needs root)"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

venv: $(VENV)/.installed

## Run Bastion with its built-in demo (http://127.0.0.1:8080, https://127.0.0.1:8443)
demo: venv
	$(VENV)/bin/bastion serve

## Run the whole test suite
test: venv
	$(PY) -m pytest -q

## Type checks and lint (also run by CI)
lint: venv
	$(VENV)/bin/ruff check proxy module integration_middleware tests
	$(VENV)/bin/mypy

bench: venv
	bash bench/run.sh

clean:
	rm -rf $(VENV) build *.egg-info
