import importlib
import os

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

OPENMMLAB_INSTALL = "run `bash tools/install_openmmlab.sh` (make test does)"


def require_openmmlab(*modules: str) -> None:
    """Skip the calling test module when an OpenMMLab package is missing, except under
    ``make test`` (``APT_DENSE_REQUIRE_OPENMMLAB=1``), where a broken install must fail loudly
    instead of skipping half the suite."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            message = f"{module} cannot be imported ({err}): {OPENMMLAB_INSTALL}"
            if os.environ.get("APT_DENSE_REQUIRE_OPENMMLAB") == "1":
                raise ImportError(message) from err
            pytest.skip(message, allow_module_level=True)

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
