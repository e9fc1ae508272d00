PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install data test lint demo bench-peers clean

# scripts/install.sh is the one install recipe, shared with the Dockerfile: torch first and on
# its own (so pip keeps that build), then the package, here editable with the dev extra and
# the fastMRI reference.
$(STAMP): pyproject.toml scripts/install.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	sh scripts/install.sh $(BIN)/python --torch "$(TORCH)" --dev --editable
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
	$(BIN)/pip install -e ".[bench]"

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
