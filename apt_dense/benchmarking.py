"""Side-by-side timing and peak memory of models on the same inputs (alternating, after warm-up),
model pairs and patching stand-ins for the tools, and the argument types their command lines
share."""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import os
import time
import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple
from pathlib import Path

import torch
from torch import nn

from .planner import TokenPlanner

__all__ = [
    "timed_call", "time_side_by_side", "MemoryPeak", "peak_memory_mib", "backbone_flops", "model_builder", "build_model_pair",
    "same_weights_pair", "host_window", "build_planner", "host_planner",
    "positive_int", "non_negative_int", "non_negative_float", "unit_fraction", "int_between", "thresholds_json",
    "image_folder", "output_path", "existing_file", "torch_device",
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, with the device's queued work finished on both ends."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


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
            times[name].append(timed_call(fn, device))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _reset_rss_high_water() -> bool:
    """Free what can be freed, then set this process's peak RSS (VmHWM) to its current RSS
    (Linux: ``/proc/self/clear_refs``). False where that is not possible."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)  # glibc keeps freed heap pages resident otherwise
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _status_mib(field: str) -> float:
    """A memory field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in MiB."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))
    return kib / 1024


class MemoryPeak(NamedTuple):
    """MiB held when a call started, and at most while it ran."""

    start: float
    peak: float


def process_peak_rss_mib() -> float | None:
    """The peak resident set size of this process since it started (``getrusage``), None where
    the platform has no ``resource`` module."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> MemoryPeak | None:
    """Memory in MiB when ``fn()`` starts and at most while it runs.

    CUDA: memory allocated on ``device`` (``torch.cuda.max_memory_allocated`` for the peak). CPU:
    the resident set size of the whole process (the peak is VmHWM, reset just before ``fn``), so
    both include the weights and everything else the process holds; the peak minus the start is
    what ``fn`` added. None on a CPU whose high-water mark cannot be reset (no
    ``/proc/self/clear_refs``): measure in a fresh process per side instead
    (:func:`process_peak_rss_mib`).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device) / 2**20
        fn()
        torch.cuda.synchronize(device)
        return MemoryPeak(start, torch.cuda.max_memory_allocated(device) / 2**20)
    if not _reset_rss_high_water():
        return None
    start = _status_mib("VmRSS")
    fn()
    return MemoryPeak(start, _status_mib("VmHWM"))


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


def model_builder(host: str, thresholds, **overrides) -> Callable[[bool], nn.Module]:
    """``build(adaptive)``: an ``APTViT`` of ``host`` with ``thresholds``, adaptive patching on or off.

    Args:
        host: a preset name from :data:`apt_dense.presets.HOSTS`.
        thresholds: ``{patch_size: threshold}``.
        overrides: host arguments to change (``img_size``, ``window_size``, ``depth``, ...);
            ``depth`` also trims ``window_block_indexes`` and ``out_indices`` (the last block
            when none is left).
    """
    from .model import APTViT
    from .presets import HOSTS, host_kwargs

    if "depth" in overrides:
        depth, preset = overrides["depth"], HOSTS[host]
        overrides.setdefault("window_block_indexes", tuple(i for i in preset.get("window_block_indexes", ()) if i < depth))
        if "out_indices" in preset:
            overrides.setdefault("out_indices", tuple(i for i in preset["out_indices"] if i < depth) or (depth - 1,))
    kwargs = host_kwargs(host, **overrides)
    return lambda adaptive: APTViT(**kwargs, thresholds=thresholds, adaptive=adaptive)


def build_model_pair(host: str, thresholds, *, seed: int = 0, **overrides):
    """``(apt, dense)``: the same random weights, adaptive patching on and off (eval mode); the
    arguments are :func:`model_builder`'s."""
    return same_weights_pair(model_builder(host, thresholds, **overrides), seed=seed)


def same_weights_pair(build: Callable[[bool], nn.Module], *, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """``(apt, dense)`` from ``build(adaptive)`` (a backbone or a whole model holding one), in eval
    mode, the dense side given the APT side's weights (its APT layers unused)."""
    torch.manual_seed(seed)
    apt = build(True).eval()
    dense = build(False).eval()
    dense.load_state_dict(apt.state_dict())
    return apt, dense


def build_planner(
    thresholds: Mapping[int, float],
    *,
    img_size: int,
    patch_size: int = 16,
    window_size: int = 0,
    scorer: str = "entropy",
    pixel_mean=None,
    pixel_std=None,
) -> TokenPlanner:
    """The :class:`TokenPlanner` of any host with this patch size, thresholds and windows (weights
    play no part in patching), for tools that only look at layouts.

    Raises:
        ValueError: naming the problem, for bad thresholds, a window that is not a multiple of
            the largest patch, or an ``img_size`` that is not a multiple of it.
    """
    planner = TokenPlanner(patch_size=patch_size, thresholds=thresholds, window_size=window_size, scorer=scorer,
                           pixel_mean=pixel_mean, pixel_std=pixel_std)
    unit = planner.size_divisibility
    if img_size % unit:
        lower, upper = img_size // unit * unit, -(-img_size // unit) * unit
        raise ValueError(f"size {img_size} px is not a multiple of the largest patch ({unit} px) of thresholds "
                         f"{planner.schedule.threshold_map()}; use " + (f"{lower} or {upper}" if lower else f"{upper}"))
    return planner


def host_window(host: str, window: int | None = None, depth: int | None = None) -> int:
    """Window side in cells of ``host``'s windowed blocks among its first ``depth`` (``window``
    overrides the preset's), 0 when it has none.

    Raises:
        ValueError: ``window`` given for a host without windowed blocks, where it would do nothing.
    """
    from .presets import HOSTS

    preset = HOSTS[host]
    blocks = [i for i in preset.get("window_block_indexes", ()) if depth is None or i < depth]
    if not blocks:
        if window is not None:
            trimmed = f" in its first {depth} blocks" if preset.get("window_block_indexes") else ""
            raise ValueError(f"--window {window}: {host} has no windowed blocks{trimmed} (global attention only), "
                             "so a window would do nothing; drop --window or choose a host with windows")
        return 0
    return window or preset["window_size"]


def host_planner(host: str, thresholds: Mapping[int, float], *, img_size: int, window: int | None = None,
                 depth: int | None = None, scorer: str = "entropy") -> TokenPlanner:
    """:func:`build_planner` for a host preset's patch size and windows (see :func:`host_window`)."""
    from .presets import HOSTS

    return build_planner(thresholds, img_size=img_size, patch_size=HOSTS[host]["patch_size"],
                         window_size=host_window(host, window, depth), scorer=scorer)


# Argument types for the tools' argparse parsers: a bad value becomes a one-line usage error.

def _number(text: str, kind: type, what: str, ok: Callable[[float], bool]):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v > 0)


def non_negative_int(text: str) -> int:
    return _number(text, int, "0 or a positive integer", lambda v: v >= 0)


def non_negative_float(text: str) -> float:
    return _number(text, float, "a number >= 0", lambda v: v >= 0)


def unit_fraction(text: str) -> float:
    return _number(text, float, "a fraction in (0, 1]", lambda v: 0 < v <= 1)


def thresholds_json(text: str) -> dict[int, float]:
    """``'{"32": 2, "64": 2, "128": 0.3}'`` -> ``{32: 2.0, 64: 2.0, 128: 0.3}``. Whether the sizes
    fit the patch size, windows and canvas is checked later, by :func:`build_planner`."""
    example = '\'{"32": 2, "64": 2, "128": 0.3}\''
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON; write a mapping like {example}") from None
    if not isinstance(value, dict) or not value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {{patch size: threshold}} mapping like {example}")
    thresholds = {}
    for key, threshold in value.items():
        if not str(key).isdigit() or isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise argparse.ArgumentTypeError(f"{key!r}: {threshold!r} is not a patch size in px with a numeric "
                                             f"threshold; write a mapping like {example}")
        thresholds[int(key)] = float(threshold)
    return thresholds


def int_between(low: int, high: int, why: str = "") -> Callable[[str], int]:
    """An argument type for integers from ``low`` to ``high``; ``why`` explains the bounds."""
    return lambda text: _number(text, int, f"an integer from {low} to {high}{why}", lambda v: low <= v <= high)


def image_folder(text: str) -> Path:
    """A folder that can be listed and holds at least one file with an image suffix."""
    from .sample_images import IMAGE_SUFFIXES, image_files

    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    try:
        files = image_files(path)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot list {text} ({err.strerror or err}); check its permissions") from None
    if not files:
        raise argparse.ArgumentTypeError(f"{text} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return path


def output_path(text: str) -> Path:
    """Where results go; an empty path (an unset variable) is refused instead of meaning ``.``."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; give a file or folder name")
    return Path(text)


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file" if path.is_dir() else f"{text} does not exist")
    return path


def torch_device(text: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` that this machine has (timing and memory are measured on
    those two kinds only)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the tools run and measure on cpu or cuda only; use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}, but this torch sees no CUDA device; use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s); use cuda:0 to cuda:{count - 1}")
    return device
