# Everything a newcomer needs: `make test` builds .venv from scratch on first use, then reuses it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= onnx,dev,triton,serve,openvino
PYTEST_ARGS ?=

.PHONY: venv test lint format clean demo

venv: $(STAMP)

# Re-run the install only when the dependency declarations change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23" setuptools wheel
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check msad_deploy training export benchmarks tests
	$(BIN)/ruff format --check msad_deploy training export benchmarks tests

format: $(STAMP)
	$(BIN)/ruff check --fix msad_deploy training export benchmarks tests
	$(BIN)/ruff format msad_deploy training export benchmarks tests

test: lint
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The whole job on the CPU, resumable: synthetic data, five models, ONNX exports, msad bench, the Pareto
# table and plot (runs/demo/bench/). About 20 minutes on 2 cores (23 with the install); see README.md.
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
