# Every target installs what it needs into .venv/ first (pins: constraints.txt).
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.fne-installed
export HF_HUB_OFFLINE := 1
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
# One ninja for DeepSpeed's JIT ops (the venv's): switching between two rebuilds the cached ops.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install test demo bench-sampler bench-step

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

test: $(STAMP)
	$(PYTHON) -m pytest

demo: $(STAMP)
	$(PYTHON) -m fne_dist.demo

bench-sampler: $(STAMP)
	$(VENV)/bin/fne-bench sampler --device cpu

bench-step: $(STAMP)
	$(VENV)/bin/fne-bench step
