"""How close APT's masks are to the dense model's: the same point prompts through both
``SamPredictor``s, and both ``SamAutomaticMaskGenerator``s' masks matched one to one.

Scores are mask IoUs at the original image size (two empty masks agree: IoU 1). For SAM-HQ
models sam-hq's predictor and generator are used.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from segment_anything.utils.amg import build_point_grid

from .encoder import APTImageEncoderViT, APTImageEncoderViTHQ

__all__ = ["ImageQuality", "compare_image", "summarise", "mask_iou", "iou_matrix", "match_masks"]


@dataclass
class ImageQuality:
    """Dense vs APT on one image.

    Attributes:
        tokens_kept, tokens_dense: encoder tokens of the full-image pass (APT, dense).
        point_prompts: single-point prompts (a grid over the image), 3 masks each.
        point_miou: mean IoU of APT's masks to the dense masks, over prompts and the 3 outputs.
        point_best_miou: the same for the output the dense model scores highest per prompt.
        amg_dense_masks, amg_apt_masks: masks each generator returned (None: not run).
        amg_matched_miou: mean IoU of the dense masks to their one-to-one APT match (0 where
            none is left), i.e. how well APT recovers the dense masks.
        amg_recall_50, amg_recall_75: fraction of dense masks matched with IoU >= 0.5 / 0.75.
    """

    name: str
    height: int
    width: int
    tokens_kept: int
    tokens_dense: int
    point_prompts: int
    point_miou: float
    point_best_miou: float
    amg_dense_masks: int | None = None
    amg_apt_masks: int | None = None
    amg_matched_miou: float | None = None
    amg_recall_50: float | None = None
    amg_recall_75: float | None = None

    @property
    def kept_fraction(self) -> float:
        return self.tokens_kept / self.tokens_dense

    def as_dict(self) -> dict:
        return {**asdict(self), "kept_fraction": self.kept_fraction}


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of corresponding boolean masks ``(..., H, W)`` -> ``(...)``; two empty masks give 1."""
    inter = (a & b).flatten(-2).sum(-1).double()
    union = (a | b).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def iou_matrix(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """``(M, H, W)`` and ``(K, H, W)`` boolean masks -> ``(M, K)`` float64 IoUs (two empty masks
    give 1). Intersections are summed over pixel chunks, so memory stays ``O((M + K) chunk)``."""
    a, b = a.flatten(1), b.flatten(1)
    inter = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for start in range(0, a.shape[1], chunk):
        # float32 sums of at most `chunk` ones are exact
        inter += (a[:, start:start + chunk].float() @ b[:, start:start + chunk].float().T).double()
    area_a, area_b = a.sum(1).double(), b.sum(1).double()
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def match_masks(iou: torch.Tensor) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching, highest IoU first: ``[(row, col, iou)]`` for pairs with IoU > 0."""
    pairs = []
    iou = iou.clone()
    while iou.numel() and iou.max() > 0:
        flat = int(iou.argmax())
        row, col = divmod(flat, iou.shape[1])
        pairs.append((row, col, float(iou[row, col])))
        iou[row, :] = -1
        iou[:, col] = -1
    return pairs


def _sam_classes(sam) -> tuple[type, type]:
    """``(SamPredictor, SamAutomaticMaskGenerator)`` of the package that runs ``sam``."""
    if isinstance(sam.image_encoder, APTImageEncoderViTHQ) or hasattr(sam.mask_decoder, "hf_token"):
        from segment_anything_hq import SamAutomaticMaskGenerator, SamPredictor
    else:
        from segment_anything import SamAutomaticMaskGenerator, SamPredictor
    return SamPredictor, SamAutomaticMaskGenerator


def _point_masks(predictor, points: np.ndarray, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks ``(N, 3, H, W)`` bool and IoU predictions ``(N, 3)`` for single foreground points."""
    masks, scores = [], []
    coords = predictor.transform.apply_coords(points, predictor.original_size)
    for start in range(0, len(points), batch):
        xy = torch.as_tensor(coords[start:start + batch], dtype=torch.float, device=predictor.device)[:, None, :]
        labels = torch.ones(xy.shape[:2], dtype=torch.int, device=predictor.device)
        m, s, _ = predictor.predict_torch(xy, labels, multimask_output=True)
        masks.append(m.cpu())
        scores.append(s.float().cpu())
    return torch.cat(masks), torch.cat(scores)


def compare_image(
    dense,
    apt,
    name: str,
    image: np.ndarray,
    *,
    points_per_side: int = 8,
    batch: int = 16,
    amg: Mapping[str, object] | None = None,
) -> ImageQuality:
    """Dense vs APT ``Sam`` models (the same weights) on one ``(H, W, 3)`` uint8 RGB image.

    Args:
        points_per_side: the point prompts are SAM's ``build_point_grid`` over the image.
        batch: prompts per decoder call.
        amg: ``SamAutomaticMaskGenerator`` arguments (e.g. ``points_per_side``,
            ``crop_n_layers``); None skips the mask generator.
    """
    if not isinstance(apt.image_encoder, APTImageEncoderViT):
        raise TypeError("the second model must have the APT image encoder (swap_image_encoder / build_apt_sam)")
    predictor_cls, generator_cls = _sam_classes(apt)
    h, w = image.shape[:2]
    points = build_point_grid(points_per_side) * np.array([[w, h]])
    outputs = []
    for model in (dense, apt):
        predictor = predictor_cls(model)
        predictor.set_image(image)
        outputs.append(_point_masks(predictor, points, batch))
    layout = apt.image_encoder.last_layout
    (dense_masks, dense_scores), (apt_masks, _) = outputs
    ious = mask_iou(dense_masks, apt_masks)  # (N, 3)
    best = ious.gather(1, dense_scores.argmax(1, keepdim=True))
    result = ImageQuality(
        name=name, height=h, width=w, tokens_kept=layout.tokens_per_image_host[0],
        tokens_dense=layout.grid_size[0] * layout.grid_size[1], point_prompts=len(points),
        point_miou=float(ious.mean()), point_best_miou=float(best.mean()),
    )
    if amg is not None:
        dense_amg, apt_amg = (_generated_masks(generator_cls(model, **amg), image) for model in (dense, apt))
        pairs = match_masks(iou_matrix(dense_amg, apt_amg)) if len(dense_amg) and len(apt_amg) else []
        matched = [iou for _, _, iou in pairs]
        count = len(dense_amg)
        result.amg_dense_masks, result.amg_apt_masks = count, len(apt_amg)
        if count:
            result.amg_matched_miou = sum(matched) / count
            result.amg_recall_50 = sum(iou >= 0.5 for iou in matched) / count
            result.amg_recall_75 = sum(iou >= 0.75 for iou in matched) / count
    return result


def _generated_masks(generator, image: np.ndarray) -> torch.Tensor:
    """``(M, H, W)`` bool masks of ``generator.generate(image)``."""
    anns = generator.generate(image)
    if not anns:
        return torch.zeros(0, *image.shape[:2], dtype=torch.bool)
    return torch.from_numpy(np.stack([ann["segmentation"] for ann in anns]))


def summarise(results: Iterable[ImageQuality]) -> dict[str, float | int | None]:
    """Overall numbers: means over images, and the pooled fraction of tokens kept."""
    results = list(results)

    def mean(field: str) -> float | None:
        values = [getattr(r, field) for r in results if getattr(r, field) is not None]
        return sum(values) / len(values) if values else None

    return {
        "images": len(results),
        "kept_fraction": sum(r.tokens_kept for r in results) / max(1, sum(r.tokens_dense for r in results)),
        **{f: mean(f) for f in ("point_miou", "point_best_miou", "amg_matched_miou", "amg_recall_50", "amg_recall_75")},
        **{f: sum(getattr(r, f) for r in results) if all(getattr(r, f) is not None for r in results) else None
           for f in ("amg_dense_masks", "amg_apt_masks")},
    }
