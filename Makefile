# Set-up and checks. `make test` and `make demo` create (or reuse) .venv and install
# what they need. TORCH_SPEC lets CI pre-select a build (e.g. torch==2.13.0, CPU);
# left empty, pip installs whatever torch the package's dependency range resolves to.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: test lint typecheck check demo diagrams clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)")
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# the demo needs only the `demo` extra; `make test` installs it too (dev includes it)
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)")
	$(BIN)/python -m pip install --quiet -e ".[demo]"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/fsm-learner demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check fsm_learner callbacks tests
	$(BIN)/ruff format --check fsm_learner callbacks tests

typecheck: $(STAMP)
	$(BIN)/mypy --strict

check: test lint typecheck

# diagrams/ is generated from the transition table; a test fails when it is stale
diagrams: $(STAMP)
	$(BIN)/fsm-learner diagram --write

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
