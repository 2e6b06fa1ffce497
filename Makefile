# The two commands of the README. Each creates the virtual environment on first use.
#   make demo   set up, then run the main job on the shipped defaults
#   make test   set up, then run the test suite (what .ci/run calls)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Tests run in two worker processes with one torch thread each: on a 2-core machine this is
# faster than one process with two threads (many tests are small or wait on subprocesses).
TEST_WORKERS ?= 2

.PHONY: demo test setup chromium

# The test extra brings Playwright; the app extra what 'swintormer app' users need (HEIC input).
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,app]'
	touch $@

# The web app's browser test drives Debian's Chromium (Playwright cannot download its own
# browsers here). Installed when missing and we are root, as in CI on a fresh clone; otherwise
# the test says it is skipped (outside CI) or fails (in CI).
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	fi

setup: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python tools/demo.py

test: $(BIN)/.installed chromium
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS)
