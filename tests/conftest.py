import numpy as np
import pytest
import torch

torch.set_num_threads(2)

SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")


def real_photos():
    """A few real RGB photographs shipped by scikit-image, as uint8 ``(H, W, 3)`` arrays."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the sample photos")
    photos = []
    for name in SAMPLE_PHOTOS:
        image = getattr(skimage_data, name)()
        photos.append(np.ascontiguousarray(image[..., :3]))
    return photos


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
