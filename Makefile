# Quick start: `make demo` and `make test` install what they need on a fresh machine first.
PYTHON ?= python3
# torch + torchvision are installed only when that pair does not import: detectron2 and
# segment-anything need torchvision's ops, and this registry's torchvision only runs beside the
# torch build of the same release (the CPU-only torch 2.13 file has none).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# detectron2 is not on PyPI: `make test` runs its tests from a source copy when one is present.
DETECTRON2_SRC ?= $(firstword $(wildcard $(CURDIR)/../shared/third_party/detectron2 /work/shared/third_party/detectron2))
# Optional integrations whose tests must run, not skip, under `make test`.
REQUIRED = openmmlab sam transformers export $(if $(DETECTRON2_SRC),detectron2)

.PHONY: install install-openmmlab demo test gpu-check

install:
	$(PYTHON) -c "import torch, torchvision.ops" 2>/dev/null || $(PYTHON) -m pip install $(TORCH_SPEC)
	$(PYTHON) -m pip install -e ".[dev]"

# mmsegmentation 1.2.2 + mmdet 3.3.0 + mmcv 2.1.0 built from source once (10-25 min on 2 cores), wheel cached.
install-openmmlab: install
	PYTHON=$(PYTHON) bash tools/install_openmmlab.sh

demo: install
	$(PYTHON) tools/demo.py

# APT_DENSE_REQUIRE: a broken install of a listed integration fails the run instead of skipping.
test: install install-openmmlab
	APT_DENSE_REQUIRE="$(REQUIRED)" PYTHONPATH="$(DETECTRON2_SRC)" $(PYTHON) -m pytest -q

# On a CUDA machine: CUDA tests, attention backends and the bf16 benchmark rows in one go.
gpu-check:
	PYTHON=$(PYTHON) bash tools/gpu_check.sh
