# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs multissl, runs the tiny recipes on the embedded data (offline)
#   make test   creates .venv, installs multissl with dev extras, runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# Test workers (pytest-xdist): two on CI's two cores, each at one thread (tests/conftest.py); whole
# files go to one worker, so a session fixture a file shares is made once per worker, not per test.
TEST_WORKERS ?= 2

.PHONY: install demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/multissl demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_text.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
