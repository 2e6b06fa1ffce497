# The two commands of the README. Each creates the virtual environment on first use.
#   make demo   set up, then run the main job on the shipped defaults
#   make test   set up, then run the test suite (what .ci/run calls)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Tests run in two worker processes with one torch thread each: on a 2-core machine this is
# faster than one process with two threads (many tests are small or wait on subprocesses).
TEST_WORKERS ?= 2

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
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS)
