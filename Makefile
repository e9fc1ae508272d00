PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install data test lint demo bench-peers clean

# torch is installed first and on its own, so that the package's `torch>=2.8` is already
# satisfied and pip never swaps in a different build. fastmri is the reference the k-space
# and metric tests compare with; its declared dependencies would replace torch, so it is
# installed without them (what it imports comes with the dev extra).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps fastmri==0.3.0
	touch $@

install: $(STAMP)

data: install
	$(BIN)/medinv data fetch

test: install data
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

DEMO := data/demo

demo: install data
	$(BIN)/medinv doctor
	$(BIN)/python pipelines/engine_demo.py
	$(BIN)/medinv data kspace --out $(DEMO)/kspace --train 0 --val 0 --test 2 --slices 4 \
		--matrix 128 --coils-min 8 --coils-max 12 --challenge multicoil --seed 1 --overwrite
	$(BIN)/medinv reconstruct $(DEMO)/kspace/multicoil_test --targets \
		$(DEMO)/kspace/multicoil_test_full --out $(DEMO)/reconstruction --preview --overwrite
	$(BIN)/medinv data brats-like --out $(DEMO)/brats_like --size small --train 0 --test 2 \
		--seed 1 --overwrite
	$(BIN)/medinv segment $(DEMO)/brats_like/test --out $(DEMO)/segmentation --preview \
		--overwrite
	$(BIN)/medinv evaluate segmentation --pred $(DEMO)/segmentation \
		--truth $(DEMO)/brats_like/test --out $(DEMO)/segmentation_metrics.csv --overwrite

bench-peers: install
	$(BIN)/pip install --no-deps iunets==0.1 memcnn==1.5.2

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
