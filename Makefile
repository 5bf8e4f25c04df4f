# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODEL := bscompress/demo/fmnist_resnet.pt
DEMO_ARCH := bscompress.demo:fmnist_resnet

.PHONY: install demo test test-slow test-all lint clean bench bench-quick bench-studies zoo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p demo-out
	$(BIN)/bscompress inspect $(DEMO_MODEL) --arch $(DEMO_ARCH)
	$(BIN)/bscompress decompose $(DEMO_MODEL) --arch $(DEMO_ARCH) --method auto \
		--budget macs=0.25 --calib demo -o demo-out/fmnist_resnet.auto.pt --force
	$(BIN)/bscompress finetune demo-out/fmnist_resnet.auto.pt --recipe recipes/demo-kd.yaml \
		-o demo-out/fmnist_resnet.auto.ft.pt --force
	@echo "accuracy on the bundled 2000-image Fashion-MNIST test subset, before and after:"
	$(BIN)/bscompress evaluate $(DEMO_MODEL) --arch $(DEMO_ARCH) --data demo
	$(BIN)/bscompress evaluate demo-out/fmnist_resnet.auto.ft.pt --data demo
	$(BIN)/bscompress export demo-out/fmnist_resnet.auto.ft.pt \
		-o demo-out/fmnist_resnet.auto.ft.onnx --data demo --force
	$(BIN)/bscompress bench $(DEMO_MODEL) demo-out/fmnist_resnet.auto.pt \
		demo-out/fmnist_resnet.auto.ft.pt --arch $(DEMO_ARCH) --data demo --runs 100 --threads 1 \
		--quiet

# docs/benchmarks.md and docs/img/ from benchmarks/ (several hours on 2 cores: the ResNet-18's
# training, the 224² scale and latency stages and the studies take most; needs Debian's
# dataset-fashion-mnist for the full test set, else the bundled subsets are used)
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# the data-aware studies section of docs/benchmarks.md alone (1×1-heavy net, narrow
# calibration; about 40 min on 2 cores, needs Debian's dataset-fashion-mnist)
bench-studies: $(STAMP)
	$(BIN)/python benchmarks/studies.py --splice docs/benchmarks.md

# a few minutes: one model, one budget, three methods; writes bench-out/quick/benchmarks.md
bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

# docs/zoo.md: torchvision and timm models through inspect, every decompose method, a
# calibrated auto budget, archive reload and ONNX export (about an hour on 2 cores; options:
# python benchmarks/zoo.py --help)
zoo: $(STAMP)
	$(BIN)/python benchmarks/zoo.py --jobs 2 --out docs/zoo.md

lint: $(STAMP)
	$(BIN)/ruff check bscompress tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_layering.py

# the fast tier (a few minutes on 2 cores); the slow tier holds the model zoo and the
# end-to-end runs of the demo and the benchmark scripts; CI runs both (.ci/run)
test: lint  # (lint ran the layering tests)
	$(BIN)/python -m pytest -m "not slow" -n 2 --deselect tests/test_layering.py

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

test-all: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache bench-out
