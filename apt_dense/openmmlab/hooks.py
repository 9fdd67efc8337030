"""Tokens kept during training, validation and testing, aggregated over all ranks."""
from __future__ import annotations

import torch
from mmengine.dist import all_reduce
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..model import TokenStats

__all__ = ["APTTokenStatsHook"]


def _apt_backbone(runner):
    model = getattr(runner.model, "module", runner.model)
    backbone = getattr(model, "backbone", None)
    return backbone if hasattr(backbone, "token_stats") else None


def _kept_fraction_over_ranks(stats: TokenStats) -> tuple[float, int]:
    """``(tokens / cells, images)`` summed over every rank (a no-op in one process)."""
    totals = torch.tensor([stats.images, stats.tokens, stats.cells], dtype=torch.float64)
    all_reduce(totals, op="sum")
    images, tokens, cells = totals.tolist()
    return (tokens / cells if cells else float("nan")), int(images)


@HOOKS.register_module()
class APTTokenStatsHook(Hook):
    """Logs ``train/apt_kept_fraction`` every iteration and the mean fraction of tokens kept
    over each validation / test run (``val/apt_kept_fraction``, also added to the metrics),
    both over the backbone inputs of all ranks (under slide inference, each crop is one input)."""

    priority = "ABOVE_NORMAL"  # before the logger hook, so the metrics carry the fraction

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        self._reset(runner)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        backbone = _apt_backbone(runner)
        if backbone is not None:
            kept, _ = _kept_fraction_over_ranks(backbone.token_stats)
            runner.message_hub.update_scalar("train/apt_kept_fraction", kept)

    def _reset(self, runner) -> None:
        backbone = _apt_backbone(runner)
        if backbone is not None:
            backbone.token_stats = TokenStats()

    def _report(self, runner, mode: str, metrics: dict | None) -> None:
        backbone = _apt_backbone(runner)
        if backbone is None:
            return
        kept, images = _kept_fraction_over_ranks(backbone.token_stats)
        runner.logger.info(f"APT {mode}: mean fraction of tokens kept {kept:.4f} over {images} backbone inputs")
        runner.message_hub.update_scalar(f"{mode}/apt_kept_fraction", kept)
        if metrics is not None:
            metrics["apt_kept_fraction"] = kept

    def before_val_epoch(self, runner) -> None:
        self._reset(runner)

    def before_test_epoch(self, runner) -> None:
        self._reset(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._report(runner, "val", metrics)

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._report(runner, "test", metrics)
