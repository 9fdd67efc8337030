"""MMDetection 3.x plugin: load with ``custom_imports = dict(imports=["apt_dense.mmdet"])``.

Registers in mmdet's ``MODELS``: the ``APTViT`` backbone (mmdet ViTDet's ``ViT`` arguments and
key names, ViTDet or EVA-02 blocks), the ``APTSimpleFPN`` neck and its ``APTLN2d`` norm (key
names of ViTDet's ``SimpleFPN`` / ``LN2d``, which mmdet's package does not ship); in mmdet's
``TRANSFORMS``, the test pipelines' ``APTLetterboxPad``. Importing it also registers
:mod:`apt_dense.openmmlab`'s ``APTRunner``, ``APTLayerDecayOptimizerConstructor`` and
``APTTokenStatsHook``. Needs mmdet 3.x with full mmcv (compiled ops); the core ``apt_dense``
package never imports them.
"""
try:
    import mmcv.ops  # noqa: F401  (mmdet.models needs mmcv's compiled ops)
    import mmdet  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without mmdet
    raise ImportError(
        "apt_dense.mmdet needs MMDetection 3.x with full mmcv (< 2.2, with compiled ops): "
        "run `bash tools/install_openmmlab.sh`, which builds mmcv 2.1.0 from source once and caches the wheel"
    ) from err

from ..openmmlab import APTLayerDecayOptimizerConstructor, APTRunner, APTTokenStatsHook
from .backbone import APTViTDetBackbone
from .checkpoint import load_pretrained_backbone
from .neck import APTLN2d, APTSimpleFPN
from .pipelines import APTLetterboxPad

__all__ = [
    "APTViTDetBackbone",
    "APTSimpleFPN",
    "APTLN2d",
    "APTLetterboxPad",
    "APTRunner",
    "APTLayerDecayOptimizerConstructor",
    "APTTokenStatsHook",
    "load_pretrained_backbone",
]
