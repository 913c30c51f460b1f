# `make run`: install everything into .venv and run the main job on the embedded default.
# `make test`: install, then run the test suite. Both are idempotent: re-running reinstalls only
# when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch lies on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
# GPU users: install your own torch first, then `pip install -e .`.
TORCH ?= torch==2.13.0

.PHONY: install run test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[dev]"
	touch $@

run: install
	$(BIN)/mua sweep
	$(BIN)/mua fit
	$(BIN)/mua transfer --to full-ft
	$(BIN)/mua transfer --to 128

# the tests also cover the optional trackers (TensorBoard, MLflow): installed for them, not for `make run`
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[dev,trackers]"
	touch $@

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check mua_cli tests benchmarks
	$(BIN)/ruff format --check mua_cli tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
