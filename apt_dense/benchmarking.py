"""Side-by-side timing of models on the same inputs (alternating, after warm-up)."""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

__all__ = ["time_side_by_side", "backbone_flops", "build_model_pair"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(
    runs: Mapping[str, Callable[[], object]], device: torch.device, warmup: int = 1, repeats: int = 3
) -> dict[str, float]:
    """Median seconds per call of each zero-argument callable, measured in alternation so that
    drift (thermal, other load) hits every side alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def backbone_flops(model, layout) -> float:
    """Multiply-add FLOPs (x2) of ``model``'s blocks on ``layout``: linear layers scale with the
    token count, attention with the sum of squared sequence lengths. Patch embedding excluded."""
    dim = model.embed_dim
    mlp = model.blocks[0].mlp
    hidden = (mlp.fc1 if hasattr(mlp, "fc1") else mlp.w1).out_features
    mlp_matrices = 2 if hasattr(mlp, "fc1") else 3
    per_token = 2 * (4 * dim * dim + mlp_matrices * dim * hidden)
    total = 0.0
    for block in model.blocks:
        seqs = layout.windows if block.use_window else layout.images
        total += per_token * layout.num_tokens + 4 * dim * float((seqs.lengths.astype("float64") ** 2).sum())
    return total


def build_model_pair(host: str, thresholds, *, seed: int = 0, **overrides):
    """``(apt, dense)``: the same random weights, adaptive patching on and off (eval mode).

    Args:
        host: a preset name from :data:`apt_dense.presets.HOSTS`.
        thresholds: ``{patch_size: threshold}``.
        overrides: host arguments to change (``img_size``, ``window_size``, ``depth``, ...);
            ``depth`` also trims ``window_block_indexes``.
    """
    from .model import APTViT
    from .presets import HOSTS, host_kwargs

    if "depth" in overrides and "window_block_indexes" not in overrides:
        windows = HOSTS[host].get("window_block_indexes", ())
        overrides["window_block_indexes"] = tuple(i for i in windows if i < overrides["depth"])
    kwargs = host_kwargs(host, **overrides)
    torch.manual_seed(seed)
    apt = APTViT(**kwargs, thresholds=thresholds).eval()
    dense = APTViT(**kwargs, thresholds=thresholds, adaptive=False).eval()
    dense.load_state_dict(apt.state_dict())
    return apt, dense
