"""Logging of tokens kept during training, validation and testing."""
from __future__ import annotations

from mmengine.hooks import Hook
from mmseg.registry import HOOKS

from ..model import TokenStats

__all__ = ["APTTokenStatsHook"]


def _apt_backbone(runner):
    model = getattr(runner.model, "module", runner.model)
    backbone = getattr(model, "backbone", None)
    return backbone if hasattr(backbone, "token_stats") else None


@HOOKS.register_module()
class APTTokenStatsHook(Hook):
    """Logs ``train/apt_kept_fraction`` every iteration and the mean fraction of tokens kept
    over each validation / test run (``val/apt_kept_fraction``, also added to the metrics)."""

    priority = "ABOVE_NORMAL"  # before the logger hook, so the metrics carry the fraction

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        backbone = _apt_backbone(runner)
        if backbone is not None:
            runner.message_hub.update_scalar("train/apt_kept_fraction", backbone.last_kept_fraction)

    def _reset(self, runner) -> None:
        backbone = _apt_backbone(runner)
        if backbone is not None:
            backbone.token_stats = TokenStats()

    def _report(self, runner, mode: str, metrics: dict | None) -> None:
        backbone = _apt_backbone(runner)
        if backbone is None:
            return
        stats = backbone.token_stats
        runner.logger.info(
            f"APT {mode}: mean fraction of tokens kept {stats.kept_fraction:.4f} over {stats.images} "
            "backbone inputs (slide inference counts each crop)"
        )
        runner.message_hub.update_scalar(f"{mode}/apt_kept_fraction", stats.kept_fraction)
        if metrics is not None:
            metrics["apt_kept_fraction"] = stats.kept_fraction

    def before_val_epoch(self, runner) -> None:
        self._reset(runner)

    def before_test_epoch(self, runner) -> None:
        self._reset(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._report(runner, "val", metrics)

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._report(runner, "test", metrics)
