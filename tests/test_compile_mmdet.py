"""torch.compile of an MMDetection Mask R-CNN holding APTViT: the backbone's blocks compiled inside
the detector compile once for a stream of batches with different token counts. Skipped as a whole
without MMDetection."""
import warnings
from pathlib import Path

import pytest
import torch
from conftest import require_openmmlab
from torch._dynamo.testing import CompileCounterWithBackend

require_openmmlab("mmcv._ext", "mmcv.ops", "mmdet")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

from test_compile import stream  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)
register_all_modules(init_default_scope=False)  # the mmseg tests of the same session use mmseg's scope
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mmdet" / "apt_vitdet_mask-rcnn_tiny_e2e.py"


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_detector_blocks_compile_once_for_a_stream():
    cfg = Config.fromfile(str(CONFIG))
    cfg.model.backbone.update(thresholds={32: 5.5})
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope("mmdet"):
        model = MODELS.build(cfg.model).eval()

    def batch(images: torch.Tensor) -> dict:
        shape = tuple(images.shape[-2:])
        meta = dict(img_shape=shape, ori_shape=shape, scale_factor=(1.0, 1.0))
        return dict(inputs=list(images), data_samples=[DetDataSample(metainfo=meta) for _ in images])

    batches = [batch(x) for x in stream(3)]
    features = lambda data: model.extract_feat(model.data_preprocessor(data)["inputs"])  # noqa: E731
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        eager = [features(data) for data in batches]
        model.backbone.compile_blocks(backend=counter)
        model.test_step(batches[0])
        frames = counter.frame_count
        results = [model.test_step(data) for data in batches[1:]]
        compiled = [features(data) for data in batches]
    assert frames > 0 and counter.frame_count == frames, "recompiled for a batch with another token count"
    assert model.backbone.token_stats.images == 3 * 6  # planning stays eager: the stats hook still counts
    assert all(len(sample.pred_instances) > 0 for samples in results for sample in samples)
    for levels, reference in zip(compiled, eager):
        for out, ref in zip(levels, reference):
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
