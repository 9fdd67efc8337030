# Quick start: `make demo` and `make test` install what they need on a fresh machine first.
PYTHON ?= python3
# torch is installed only when missing; this machine's registry serves a CPU build of 2.13.0.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-mmseg demo test

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[dev]"

# mmsegmentation 1.2.2 + mmcv 2.1.0 built from source once (~10 min on 2 cores), wheel cached.
install-mmseg: install
	PYTHON=$(PYTHON) bash tools/install_mmseg.sh

demo: install
	$(PYTHON) tools/demo.py

test: install install-mmseg
	$(PYTHON) -m pytest -q
