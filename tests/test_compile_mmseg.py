"""torch.compile of an mmseg UperNet holding APTViT: compiled blocks inside the segmentor, and the
whole segmentor under torch.compile. Skipped as a whole without mmsegmentation."""
import warnings
from pathlib import Path

import pytest
import torch
from conftest import require_openmmlab
from torch._dynamo.testing import CompileCounterWithBackend

require_openmmlab("mmcv._ext", "mmcv.ops", "mmseg")

from mmengine.config import Config  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

from test_compile import stream  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)
register_all_modules()
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "apt_upernet_tiny_e2e.py"


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def tiny_segmentor():
    cfg = Config.fromfile(str(CONFIG))
    cfg.model.backbone.update(embed_dim=32, depth=2, out_indices=[0, 0, 1, 1], thresholds={32: 5.5})
    cfg.model.decode_head.update(in_channels=[32] * 4, channels=16)
    cfg.model.auxiliary_head.update(in_channels=32, channels=16)
    torch.manual_seed(0)
    return MODELS.build(cfg.model).eval()


@pytest.mark.parametrize("whole", [False, True], ids=["compile_blocks", "torch.compile(segmentor)"])
def test_segmentor_compiles_once_for_a_stream(whole):
    model = tiny_segmentor()
    batches = [(x - 128.0) / 64.0 for x in stream(3)]  # normalised as the data preprocessor leaves them
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        eager = [model._forward(x) for x in batches]
        if whole:
            run = torch.compile(model._forward, backend=counter)
        else:
            model.backbone.compile_blocks(backend=counter)
            run = model._forward
        outputs = [run(x) for x in batches[:1]]
        frames = counter.frame_count
        outputs += [run(x) for x in batches[1:]]
    assert counter.frame_count == frames, "recompiled for a batch with another token count"
    for out, reference in zip(outputs, eager):
        torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
