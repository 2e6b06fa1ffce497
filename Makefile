# The two commands of the README. Each creates the virtual environment on first use.
#   make demo   set up, then run the main job on the shipped defaults
#   make test   set up, then run the test suite (what .ci/run calls)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test setup

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python tools/demo.py

test: $(BIN)/.installed
	$(BIN)/python -m pytest
