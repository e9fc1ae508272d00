PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install data test lint demo bench-peers clean

# torch is installed first and on its own, so that the package's `torch>=2.8` is already
# satisfied and pip never swaps in a different build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(STAMP)

data: install
	$(BIN)/medinv data fetch

test: install data
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

demo: install data
	$(BIN)/medinv doctor
	$(BIN)/python pipelines/engine_demo.py

bench-peers: install
	$(BIN)/pip install --no-deps iunets==0.1 memcnn==1.5.2

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
