"""Side-by-side timing and peak memory of models on the same inputs (alternating, after warm-up),
model pairs and patching stand-ins for the tools, and the argument types their command lines
share."""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
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
from .presets import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD

__all__ = [
    "timed_call", "SideTimes", "times_side_by_side", "time_side_by_side", "MemoryPeak", "peak_memory_mib", "backbone_flops", "model_builder", "build_model_pair",
    "same_weights_pair", "host_window", "build_planner", "host_planner", "HOST_FAMILIES", "host_family", "host_setting",
    "setting_label", "check_host_library", "host_size", "add_patching_arguments", "resolve_host_arguments", "tool_planner", "same_size_maps", "host_image", "padded_to", "apt_engine", "apt_layout", "dense_layout", "dinov2_config",
    "backbone_builder", "sam_builder",
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


class SideTimes(NamedTuple):
    """Seconds of every timed call of one side: wall clock, and this process's CPU time (all
    threads; what other processes on a shared machine inflate least)."""

    wall: list[float]
    cpu: list[float]

    @property
    def median(self) -> float:
        return sorted(self.wall)[len(self.wall) // 2]

    @property
    def cpu_median(self) -> float:
        return sorted(self.cpu)[len(self.cpu) // 2]


def times_side_by_side(
    runs: Mapping[str, Callable[[], object]], device: torch.device, warmup: int = 1, repeats: int = 3
) -> dict[str, SideTimes]:
    """Every timed call of each zero-argument callable, measured in alternation so that drift
    (thermal, other load) hits every side alike, after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    _sync(device)
    times = {name: SideTimes([], []) for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            cpu = time.process_time()
            times[name].wall.append(timed_call(fn, device))
            times[name].cpu.append(time.process_time() - cpu)
    return times


def time_side_by_side(
    runs: Mapping[str, Callable[[], object]], device: torch.device, warmup: int = 1, repeats: int = 3
) -> dict[str, float]:
    """Median seconds per call of each zero-argument callable (:func:`times_side_by_side`)."""
    return {name: t.median for name, t in times_side_by_side(runs, device, warmup, repeats).items()}


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
    """Multiply-add FLOPs (x2) of ``model``'s blocks on ``layout``: every linear layer of a block
    (attention projections and whichever MLP the host has: ``fc1/fc2``, SAM's ``lin1/lin2``,
    EVA-02's and DINOv2's gated ones) scales with the token count, attention with the sum of
    squared sequence lengths. Patch embedding and heads (SAM's neck) excluded."""
    dim = model.embed_dim
    total = 0.0
    for block in model.blocks:
        per_token = 2 * sum(m.in_features * m.out_features for m in block.modules() if isinstance(m, nn.Linear))
        seqs = layout.windows if getattr(block, "use_window", False) else layout.images
        total += per_token * layout.num_tokens + 4 * dim * float((seqs.lengths.astype("float64") ** 2).sum())
    return total


# Host families whose models come from another library (built lazily, with a clear message when
# it is missing): their images are prepared as that library's own pipeline does.
HOST_FAMILIES = {"vit": "the ViTDet / EVA-02 letterbox", "sam": "SamPredictor's letterbox",
                 "dinov2": "Depth Anything's image processor"}


def host_family(host: str | None) -> str:
    """``"sam"`` (Segment Anything's encoders), ``"dinov2"`` (DINOv2, Depth Anything) or ``"vit"``
    (also for no host: a plain letterboxed canvas)."""
    from .presets import HOSTS

    if host is None:
        return "vit"
    if host.startswith("sam_"):
        return "sam"
    return "dinov2" if HOSTS[host].get("block_type") == "dinov2" else "vit"


def check_host_library(host: str | None) -> None:
    """Import the library a host's models and image pipeline come from (segment-anything for SAM,
    transformers for DINOv2).

    Raises:
        ValueError: naming the host and the install command, when it is missing.
    """
    family = host_family(host)
    if family == "vit":
        return
    module, extra = ("apt_dense.sam", "sam") if family == "sam" else ("apt_dense.transformers", "transformers")
    try:
        __import__(module)
    except ImportError as err:
        raise ValueError(f"--host {host} needs {'segment-anything' if family == 'sam' else 'transformers 5'}: "
                         f"pip install 'apt-dense[{extra}]' ({err})") from None


def host_setting(host: str | None, default: str) -> str:
    """The thresholds setting made for ``host``'s family (``sam``, ``depth``), else ``default``."""
    return {"sam": "sam", "dinov2": "depth"}.get(host_family(host), default)


def setting_label(setting: str) -> str:
    """Where a setting of :data:`~apt_dense.presets.APT_SETTINGS` comes from, for tables and plots."""
    return {"sam": "the SAM setting, calibrated on photos at SAM's 1024 canvas",
            "depth": "the depth setting, the paper's segmentation threshold translated to 14 px patches",
            }.get(setting, f"the paper's {setting} setting")


def host_size(host: str | None, size: int | None, default: int) -> int:
    """The canvas (SAM: its 1024, fixed by the checkpoints) or processor size (DINOv2: 518) of
    ``host`` when ``size`` is None, else ``size``.

    Raises:
        ValueError: a SAM canvas other than the encoder's.
    """
    from .presets import HOSTS

    if host is None:
        return size or default
    family = host_family(host)
    native = HOSTS[host]["img_size"]
    if family == "sam" and size not in (None, native):
        raise ValueError(f"--size {size}: SAM's image encoder takes {native} px canvases (its checkpoints fix the "
                         f"position grid and SamPredictor resizes every image to it); drop --size")
    return size or (native if family != "vit" else default)


def add_patching_arguments(parser: argparse.ArgumentParser, default_size: int, default_setting: str) -> None:
    """A patching tool's ``--host``, ``--size``, ``--patch-size`` and ``--setting`` (completed by
    :func:`resolve_host_arguments` after parsing)."""
    from .presets import APT_SETTINGS, HOSTS

    parser.add_argument("--host", default=None, choices=sorted(HOSTS),
                        help="prepare images and patch as this host does (its patch size, windows, image pipeline)")
    parser.add_argument("--size", type=positive_int, default=None,
                        help=f"square canvas (ViTDet-style letterbox), a multiple of the largest patch (default "
                             f"{default_size}; SAM: its 1024; DINOv2: the processor's size, default 518)")
    parser.add_argument("--patch-size", type=positive_int, default=None,
                        help="base patch in px (default 16, or the host's)")
    parser.add_argument("--setting", default=None, choices=sorted(APT_SETTINGS),
                        help=f"base thresholds (default: the host's setting, else {default_setting})")


def resolve_host_arguments(args, default_size: int, default_setting: str) -> None:
    """A patching tool's ``--host``, ``--size``, ``--patch-size`` and ``--setting`` completed in
    place: the host's library present, its canvas (or processor size), patch size and setting
    where not given; without a host, ``default_size``, 16 px and ``default_setting``.

    Raises:
        ValueError: the host's library is missing, or ``--patch-size`` differs from its patch.
    """
    from .presets import HOSTS

    check_host_library(args.host)
    args.size = host_size(args.host, args.size, default_size)
    args.setting = args.setting or host_setting(args.host, default_setting)
    if args.host is not None:
        patch = HOSTS[args.host]["patch_size"]
        if args.patch_size not in (None, patch):
            raise ValueError(f"--patch-size {args.patch_size}: {args.host}'s patches are {patch} px; drop --patch-size")
        args.patch_size = patch
    args.patch_size = args.patch_size or 16


def tool_planner(args, thresholds: Mapping[int, float]) -> TokenPlanner:
    """A patching tool's planner on raw 0..255 pixels: ``args.host``'s patch size and windows
    (:func:`host_planner`), or ``args.patch_size`` without a host."""
    if args.host is not None:
        return host_planner(args.host, thresholds, img_size=args.size, scorer=args.scorer)
    return build_planner(thresholds, img_size=args.size, patch_size=args.patch_size, scorer=args.scorer)


def same_size_maps(maps: list) -> list:
    """:class:`~apt_dense.visualize.PatchMap` pictures on white canvases of the largest one's size
    (top-left), for one sheet: DINOv2 hosts keep each image's aspect ratio."""
    from PIL import Image

    width = max(m.picture.size[0] for m in maps)
    height = max(m.picture.size[1] for m in maps)
    framed = []
    for m in maps:
        canvas = Image.new("RGB", (width, height), "white")
        canvas.paste(m.picture, (0, 0))
        framed.append(dataclasses.replace(m, picture=canvas))
    return framed


@functools.cache
def _depth_processor(size: int):
    """Depth Anything's image processor at ``size`` (one per size, built once)."""
    try:
        from .transformers.quality import depth_anything_processor
    except ImportError as err:
        raise ImportError(f"DINOv2 / Depth Anything hosts need transformers 5: pip install 'apt-dense[transformers]' "
                          f"({err})") from None
    return depth_anything_processor(size)


def host_image(host: str | None, image, size: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """An ``(H, W, 3)`` uint8 RGB photo as ``host``'s own pipeline feeds the model.

    ``vit``: letterboxed to a ``size`` square (ViTDet's LSJ, padded with the mean colour);
    ``sam``: ``SamPredictor``'s letterbox (:func:`apt_dense.sam.sam_input`: the longest side
    resized to ``size``, normalised, zeros bottom/right); ``dinov2``: Depth Anything's image
    processor (shorter side about ``size``, aspect kept, sides multiples of 14; no padding).
    All are normalised with the ImageNet statistics (SAM's too).

    Returns:
        ``(raw, normalised)``, both ``(3, H, W)`` float32: ``normalised`` is the model's input;
        ``raw`` the same image on the 0..255 scale with the normalisation undone (padding is the
        mean colour), padded with the mean colour to a multiple of ``multiple`` (the largest
        patch), which is what the planner scores.
    """
    from .sample_images import letterbox, normalise

    family = host_family(host)
    if family == "vit":
        raw = letterbox(image, size, IMAGENET_PIXEL_MEAN)[0]
        return raw, normalise(raw[None], IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD)[0]
    if family == "sam":
        try:
            from .sam import sam_input
        except ImportError as err:
            raise ImportError(f"{host} needs segment-anything: pip install 'apt-dense[sam]' ({err})") from None
        x = sam_input(image, size)[0][0]
    else:
        x = _depth_processor(size)(images=image, return_tensors="pt").pixel_values[0]
    mean = torch.tensor(IMAGENET_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_PIXEL_STD).view(3, 1, 1)
    # Snapped to 1/256 as the planner undoes a normalisation (scoring.to_intensity), so that raw
    # and normalised inputs get the same plan.
    return torch.round((padded_to(x, multiple) * std + mean) * 256.0) / 256.0, x


def padded_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``(..., H, W)`` zero-padded bottom/right to multiples of ``multiple``, as the APT models
    pad inputs of other sizes (zeros in normalised inputs: the mean colour)."""
    return torch.nn.functional.pad(x, (0, -x.shape[-1] % multiple, 0, -x.shape[-2] % multiple))


def apt_engine(model: nn.Module):
    """The :class:`~apt_dense.APTViT` that runs an APT model (``planner``, ``blocks``,
    ``compile_blocks``): the model itself, or an ``APTDinov2Backbone``'s ``apt``."""
    return getattr(model, "apt", model)


def apt_layout(model: nn.Module, x: torch.Tensor):
    """The layout an APT model plans for the normalised batch ``x`` (padded as it pads)."""
    engine = apt_engine(model)
    return engine.planner(padded_to(x, engine.size_divisibility))


def dense_layout(model: nn.Module, x: torch.Tensor):
    """The layout of the dense model beside an APT model: every cell of ``x`` a base patch."""
    engine = apt_engine(model)
    planner = TokenPlanner(patch_size=engine.patch_size, window_size=engine.window_size, adaptive=False)
    return planner(x.new_zeros(1, x.shape[1], x.shape[-2] // engine.patch_size * engine.patch_size,
                               x.shape[-1] // engine.patch_size * engine.patch_size).expand(x.shape[0], -1, -1, -1))


def dinov2_config(host: str, depth: int | None = None, out_indices=None):
    """transformers' ``Dinov2Config`` of ``host``'s shapes at 518 px, the feature maps as
    sequences (as Depth Anything reads them); ``depth``: fewer blocks, the last four read."""
    from transformers import Dinov2Config

    from .presets import HOSTS

    shape = HOSTS[host]
    layers = depth or shape["depth"]
    stages = [i + 1 for i in shape["out_indices"]] if depth is None else list(range(layers - 3, layers + 1))
    return Dinov2Config(hidden_size=shape["embed_dim"], num_hidden_layers=layers, num_attention_heads=shape["num_heads"],
                        image_size=518, patch_size=14, out_indices=stages, reshape_hidden_states=False)


def backbone_builder(host: str, thresholds, **overrides) -> Callable[[bool], nn.Module]:
    """``build(adaptive)`` of any host's backbone at the tools' backbone level, seeded so that
    both sides get the same weights: :func:`model_builder`'s ``APTViT`` for ``vit`` hosts;
    Segment Anything's own ``ImageEncoderViT`` (dense) and :class:`~apt_dense.sam.APTImageEncoderViT`
    (APT) for ``sam`` hosts; transformers' ``Dinov2Backbone`` and
    :class:`~apt_dense.transformers.APTDinov2Backbone` for ``dinov2`` hosts. ``overrides``:
    ``depth``, ``attention_backend`` (others only for ``vit`` hosts)."""
    family = host_family(host)
    if family == "vit":
        return model_builder(host, thresholds, **overrides)
    depth, backend = overrides.get("depth"), overrides.get("attention_backend", "auto")
    if family == "sam":
        return lambda adaptive: sam_builder(host, thresholds, depth=depth, attention_backend=backend)(adaptive).image_encoder

    def build(adaptive: bool) -> nn.Module:
        try:
            from transformers import Dinov2Backbone

            from .transformers import APTDinov2Backbone
        except ImportError as err:
            raise ImportError(f"{host} needs transformers 5: pip install 'apt-dense[transformers]' ({err})") from None
        dense = Dinov2Backbone(dinov2_config(host, depth)).eval()
        return APTDinov2Backbone.from_dense(dense, thresholds=thresholds, attention_backend=backend) if adaptive else dense

    return build


def sam_builder(host: str, thresholds, *, depth: int | None = None, attention_backend: str = "auto"):
    """``build(adaptive)``: a whole ``Sam`` of ``host``'s shape (random weights, eval mode),
    segment-anything's own (dense) or with the APT image encoder swapped in (pair them with
    :func:`same_weights_pair`)."""
    try:
        from .sam import build_dense_sam, swap_image_encoder
    except ImportError as err:
        raise ImportError(f"{host} needs segment-anything: pip install 'apt-dense[sam]' ({err})") from None

    def build(adaptive: bool) -> nn.Module:
        sam = build_dense_sam(host.removeprefix("sam_"), depth=depth).eval()
        return swap_image_encoder(sam, thresholds=thresholds, attention_backend=attention_backend) if adaptive else sam

    return build


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
    mode, the dense side given the APT side's weights: all of them for an APT model with adaptive
    patching off (its APT layers unused); all but the APT layers for a host library's own model
    (SAM's encoder, transformers' DINOv2), whose keys APT's share."""
    torch.manual_seed(seed)
    apt = build(True).eval()
    dense = build(False).eval()
    weights = apt.state_dict()
    missing = [key for key in dense.state_dict() if key not in weights]
    if missing:
        raise ValueError(f"the dense model has weights the APT model lacks: {missing[:5]}")
    dense.load_state_dict({key: weights[key] for key in dense.state_dict()})
    return apt, dense


def build_planner(
    thresholds: Mapping[int, float],
    *,
    img_size: int | None,
    patch_size: int = 16,
    window_size: int = 0,
    scorer: str = "entropy",
    pixel_mean=None,
    pixel_std=None,
) -> TokenPlanner:
    """The :class:`TokenPlanner` of any host with this patch size, thresholds and windows (weights
    play no part in patching), for tools that only look at layouts.

    ``img_size`` None: images of any size, padded to the largest patch (DINOv2's).

    Raises:
        ValueError: naming the problem, for bad thresholds, a window that is not a multiple of
            the largest patch, or an ``img_size`` that is not a multiple of it.
    """
    planner = TokenPlanner(patch_size=patch_size, thresholds=thresholds, window_size=window_size, scorer=scorer,
                           pixel_mean=pixel_mean, pixel_std=pixel_std)
    unit = planner.size_divisibility
    if img_size is not None and img_size % unit:
        lower, upper = img_size // unit * unit, -(-img_size // unit) * unit
        raise ValueError(f"size {img_size} px is not a multiple of the largest patch ({unit} px) of thresholds "
                         f"{planner.schedule.threshold_map()}; use " + (f"{lower} or {upper}" if lower else f"{upper}"))
    return planner


def host_window(host: str, window: int | None = None, depth: int | None = None) -> int:
    """Window side in cells of ``host``'s windowed blocks among its first ``depth`` (``window``
    overrides the preset's), 0 when it has none.

    Raises:
        ValueError: ``window`` given for a host without windowed blocks, where it would do nothing,
            or for a SAM / DINOv2 host, whose model fixes its windows; ``depth`` above the host's.
    """
    from .presets import HOSTS

    if depth is not None and depth > HOSTS[host]["depth"]:
        raise ValueError(f"--depth {depth}: {host} has {HOSTS[host]['depth']} blocks, and --depth runs the first "
                         f"of them: give 1 to {HOSTS[host]['depth']}, or leave it out for all")
    if window is not None and host_family(host) != "vit":
        raise ValueError(f"--window: {host}'s windows are the host model's own; drop --window")
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
    """:func:`build_planner` for a host preset's patch size and windows (see :func:`host_window`);
    for DINOv2 hosts, whose images are padded to the largest patch, ``img_size`` is not checked."""
    from .presets import HOSTS

    return build_planner(thresholds, img_size=None if host_family(host) == "dinov2" else img_size,
                         patch_size=HOSTS[host]["patch_size"], window_size=host_window(host, window, depth),
                         scorer=scorer)


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
