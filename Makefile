# Two entry points the README starts with: `make demo` and `make test`.
# Both create the virtual environment on first use (Python 3.11+).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup demo test bench
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-test.txt -e .
	touch $@

demo: setup
	$(PY) -m llm_activations extract --overwrite

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests
