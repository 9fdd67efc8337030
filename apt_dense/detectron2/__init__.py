"""detectron2 plugin: an ``APTViT`` backbone, configs helpers, checkpoint loading.

Importing this package needs detectron2 (not on PyPI; install it following
https://detectron2.readthedocs.io/en/latest/tutorials/install.html). The core ``apt_dense``
package never imports detectron2.
"""
try:
    import detectron2  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without detectron2
    raise ImportError(
        "apt_dense.detectron2 needs detectron2, which is not on PyPI. Install it from source: "
        "python -m pip install 'git+https://github.com/facebookresearch/detectron2.git' "
        "(see https://detectron2.readthedocs.io/en/latest/tutorials/install.html)"
    ) from err

from .backbone import APTViT, add_apt_vit_config, build_apt_vit_fpn_backbone
from ..checkpoints import convert_eva02_pretrain
from .checkpoint import APTCheckpointer, load_backbone_checkpoint
from .lr_decay import get_apt_vit_lr_decay_rate
from .swap import swap_to_apt

__all__ = [
    "APTCheckpointer",
    "APTViT",
    "add_apt_vit_config",
    "build_apt_vit_fpn_backbone",
    "convert_eva02_pretrain",
    "get_apt_vit_lr_decay_rate",
    "load_backbone_checkpoint",
    "swap_to_apt",
]
