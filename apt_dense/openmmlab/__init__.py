"""What the mmsegmentation and MMDetection plugins share, on mmengine alone.

Registers into mmengine's root registries, which mmseg's and mmdet's registries search too:

- ``APTRunner`` (``runner_type="APTRunner"``): loads weights after ``init_weights`` and reads
  checkpoints as data, freezes for the APT-only fine-tune before DistributedDataParallel wraps the
  model, refuses to silently restart in a work dir that holds a run, and runs distributed on CPU
  with gloo;
- ``APTTokenStatsHook``: tokens kept, aggregated over ranks;
- ``APTLayerDecayOptimizerConstructor``: layer-wise lr decay that knows the APT layers.
"""
try:
    import mmengine  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without mmengine
    raise ImportError(
        "apt_dense.openmmlab needs mmengine (installed with mmsegmentation and mmdet by `bash tools/install_openmmlab.sh`)"
    ) from err

from .hooks import APTTokenStatsHook
from .optimizer import APTLayerDecayOptimizerConstructor
from .runner import APTRunner

__all__ = ["APTRunner", "APTTokenStatsHook", "APTLayerDecayOptimizerConstructor"]
