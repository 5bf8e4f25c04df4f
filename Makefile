# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODEL := bscompress/demo/fmnist_resnet.pt
DEMO_ARCH := bscompress.demo:fmnist_resnet

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bscompress inspect $(DEMO_MODEL) --arch $(DEMO_ARCH)
	$(BIN)/bscompress evaluate $(DEMO_MODEL) --arch $(DEMO_ARCH) --data demo

lint: $(STAMP)
	$(BIN)/ruff check bscompress tests benchmarks

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
