# Quick start: `make demo` and `make test` install what they need on a fresh machine first.
PYTHON ?= python3
# torch is installed only when missing; this machine's registry serves a CPU build of 2.13.0.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-openmmlab demo test

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[dev]"

# mmsegmentation 1.2.2 + mmdet 3.3.0 + mmcv 2.1.0 built from source once (10-25 min on 2 cores), wheel cached.
install-openmmlab: install
	PYTHON=$(PYTHON) bash tools/install_openmmlab.sh

demo: install
	$(PYTHON) tools/demo.py

# APT_DENSE_REQUIRE_OPENMMLAB: a broken mmcv/mmseg/mmdet install fails the run instead of skipping.
test: install install-openmmlab
	APT_DENSE_REQUIRE_OPENMMLAB=1 $(PYTHON) -m pytest -q
