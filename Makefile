# One entry point for a fresh machine: `make test` installs everything the tests need into
# .venv (torch pinned, Fashion-MNIST from Debian, Chromium for the browser test) and runs them.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-dev data gpu-data browser test test-fast quickstart lint mutation

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e .

install-dev: $(BIN)/python data
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"

# Real images for tests, the benchmark and the demo gallery (see docs/data.md).
data:
	@test -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz || \
	  ( $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist )

# What a GPU machine without network needs beside the checkout (docs/benchmarks.md, GPU):
# Fashion-MNIST, the photos of scikit-image/-learn and the commit id in data/ (ignored; send it
# with carry=["data"]).
gpu-data: data
	mkdir -p data/fashion-mnist
	cp /usr/share/datasets/fashion-mnist/*-ubyte.gz data/fashion-mnist/
	$(BIN)/python benchmarks/input_pipeline.py --save-photos  # data/photos/*.png (input_pipeline)
	{ git rev-parse HEAD; git status --porcelain --untracked-files=no | grep -q . && \
	  echo "uncommitted changes at $$(date -u +%FT%TZ)" || true; } > data/COMMIT

browser:
	@test -x /usr/bin/chromium || \
	  ( $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium )

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The main job on the embedded default model: index a gallery of real images, search it.
quickstart: install data
	$(BIN)/smi-hub quickstart

test: install-dev browser
	$(BIN)/python -m pytest -q

# The unit tests and one test of each critical path (tests/test_fast_selection.py names them;
# docs/testing.md, "Fast and steady": what it leaves to `make test`, how long it takes).
test-fast: install-dev
	$(BIN)/python -m pytest -q -m "not slow and not browser"

# Mutation testing (mutmut) of the modules where a silent defect costs users most, each against
# its own tests; about 30 min on 2 cores. Scores and survivors: docs/testing.md.
# One module: make mutation MODULES=training/losses.py
mutation: install-dev
	.ci/mutation $(MODULES)

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
