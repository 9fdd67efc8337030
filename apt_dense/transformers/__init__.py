"""Adaptive Patch Transformers inside Hugging Face transformers: DINOv2 backbones and the dense
models built on them (Depth Anything, DPT with a DINOv2 backbone).

- :class:`APTDinov2Backbone`: a drop-in for ``Dinov2Backbone`` and ``Dinov2WithRegistersBackbone``
  (same config object, same state-dict keys, same ``BackboneOutput``);
- :func:`swap_to_apt`: replace the DINOv2 backbone of a model already built or loaded;
- :func:`from_pretrained`: load a local model folder and swap, reporting the APT layers the folder
  lacks.

Nothing here downloads: folders are local (``local_files_only``).
"""
from __future__ import annotations

try:
    import transformers as _transformers
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "apt_dense.transformers needs Hugging Face transformers 5.x: pip install 'apt-dense[transformers]' "
        f"(or pip install 'transformers>=5,<6'); importing it failed: {err}"
    ) from err

if int(_transformers.__version__.split(".")[0]) < 5:
    raise ImportError(
        f"apt_dense.transformers needs transformers 5.x (DINOv2 keys attention.q_proj/o_proj); found "
        f"{_transformers.__version__}: pip install 'transformers>=5,<6'"
    )

from .backbone import APTDinov2Backbone, apt_kwargs_from_config  # noqa: E402
from .swap import from_pretrained, swap_to_apt  # noqa: E402

__all__ = ["APTDinov2Backbone", "apt_kwargs_from_config", "swap_to_apt", "from_pretrained"]
