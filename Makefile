# Set-up and everyday commands. Every target creates the virtual environment on first use.
#   make demo    the main job: a small reproduction that runs in minutes on a CPU
#   make test    the test suite
#   make bench   cost benchmarks (tables + JSON under benchmarks/results/)
#   make lint    ruff lint + format check, mypy
# TORCH_SPEC picks the PyTorch build installed first (any torch >= 2.2 works with funcbo).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= experiments,bench,dev,tensorboard,ray
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/funcbo demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/hypergradient_cost.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
