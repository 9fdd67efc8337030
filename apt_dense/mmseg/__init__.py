"""mmsegmentation 1.x plugin: load with ``custom_imports = dict(imports=["apt_dense.mmseg"])``.

Registers the ``APTViT`` backbone (EVA-02 segmentation style); importing it also registers
:mod:`apt_dense.openmmlab`'s ``APTRunner``, ``APTLayerDecayOptimizerConstructor`` and
``APTTokenStatsHook``. Needs mmsegmentation 1.x with full mmcv (compiled ops); the core
``apt_dense`` package never imports them.
"""
try:
    import mmcv.ops  # noqa: F401  (mmseg.utils needs mmcv's compiled ops)
    import mmseg  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without mmseg
    raise ImportError(
        "apt_dense.mmseg needs mmsegmentation 1.x with full mmcv (< 2.2, with compiled ops): "
        "run `bash tools/install_openmmlab.sh`, which builds mmcv 2.1.0 from source once and caches the wheel"
    ) from err

from ..openmmlab import APTLayerDecayOptimizerConstructor, APTRunner, APTTokenStatsHook
from .backbone import APTViTSegBackbone
from .checkpoint import convert_eva02_seg_checkpoint, load_apt_checkpoint

__all__ = [
    "APTViTSegBackbone",
    "APTRunner",
    "APTLayerDecayOptimizerConstructor",
    "APTTokenStatsHook",
    "convert_eva02_seg_checkpoint",
    "load_apt_checkpoint",
]
