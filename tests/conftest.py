import importlib
import os

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

# How to install each optional integration, by the group name that APT_DENSE_REQUIRE lists.
INSTALL_HINTS = {
    "openmmlab": "run `bash tools/install_openmmlab.sh` (make test does)",
    "detectron2": "detectron2 is not on PyPI: put its source on PYTHONPATH (make test does when "
                  "../shared/third_party/detectron2 exists) or install it as the README's detectron2 section says",
    "sam": "pip install -e .[sam] (segment-anything, segment-anything-hq)",
    "transformers": "pip install -e .[transformers]",
    "export": "pip install -e .[export] (onnx, onnxruntime, onnxscript)",
}


def require(group: str, *modules: str) -> None:
    """Skip the calling test module when a module of an optional integration cannot be imported,
    except where ``APT_DENSE_REQUIRE`` names the group (``make test`` names every group it
    installs): there a broken install must fail loudly instead of skipping part of the suite."""
    required = os.environ.get("APT_DENSE_REQUIRE", "").replace(",", " ").split()
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            message = f"{module} cannot be imported ({err}): {INSTALL_HINTS[group]}"
            if group in required or "all" in required:
                raise ImportError(message) from err
            pytest.skip(message, allow_module_level=True)


def require_openmmlab(*modules: str) -> None:
    require("openmmlab", *modules)

SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")


def real_photos():
    """A few real RGB photographs shipped by scikit-image, as uint8 ``(H, W, 3)`` arrays."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the sample photos")
    photos = []
    for name in SAMPLE_PHOTOS:
        image = getattr(skimage_data, name)()
        photos.append(np.ascontiguousarray(image[..., :3]))
    return photos


@pytest.fixture
def fresh_dynamo():
    """Empty compile caches before and after a test: compiled entries of earlier tests would count
    towards dynamo's recompile limit and hide recompilations."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def photos():
    return real_photos()


def photo_batch(photos, size, count=None):
    """Crop/resize photos to ``size x size`` raw 0..255 float ``(B, 3, size, size)``."""
    out = []
    for image in photos[:count]:
        t = torch.from_numpy(image).permute(2, 0, 1).float().unsqueeze(0)
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        out.append(t.round().clamp(0, 255))
    return torch.cat(out)
