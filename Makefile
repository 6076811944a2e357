# Two commands do all the set-up on a fresh machine:
#   make train   creates .venv, installs cenet, trains the main job on CIFAR-10
#   make test    creates .venv, installs cenet with its dev extras, runs the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: install train test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Resumes runs/main from its last checkpoint when one exists (a killed run loses nothing);
# a run directory without a checkpoint holds no trained work and is started afresh.
train: $(STAMP)
	@if [ -f runs/main/last.pt ]; then mode=--resume; else mode=--overwrite; fi; \
	echo "$(BIN)/cenet train --config main $$mode $(ARGS)"; \
	$(BIN)/cenet train --config main $$mode $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_block.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info
