# Quick start: `make demo` and `make test` install what they need on a fresh machine first.
PYTHON ?= python3
# torch is installed only when missing; this machine's registry serves a CPU build of 2.13.0.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[dev]"

demo: install
	$(PYTHON) tools/demo.py

test: install
	$(PYTHON) -m pytest -q
