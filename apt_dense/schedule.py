"""Stage 2a: the patch-size schedule and the quadtree rule that turns scores into levels.

Thresholds have one form, a mapping ``{patch_size: threshold}`` with an entry for every size
coarser than the base patch, e.g. ``{32: 2.0, 64: 2.0, 128: 0.3}`` (the paper's detection
setting). Configs that keep the public APT code's ascending list convert it with
:func:`thresholds_from_sequence` first.

Configs often carry numbers in other types: JSON and YAML mapping keys are strings
(``{"32": 2.0}``), and values may be numpy or 0-d torch scalars. Patch sizes that are integers in
disguise (``"32"``, ``np.int64(32)``, ``32.0``) and thresholds that are real scalars are accepted
and converted to ``int`` / ``float``; anything else is rejected with the offending value named.
"""
from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .arguments import integer

__all__ = ["PatchSchedule", "merged_config_thresholds", "select_levels", "thresholds_from_sequence"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatchSchedule:
    """Patch sizes ``base * 2**k`` for ``k = 0..num_levels`` and one threshold per ``k >= 1``.

    A level-``k`` patch is used where its score is strictly below ``thresholds[k - 1]`` and no
    coarser used patch covers it (:func:`select_levels`).

    Attributes:
        base_patch_size: the host ViT's patch size ``p`` in pixels.
        thresholds: ``thresholds[k - 1]`` belongs to level ``k`` (patch side ``p * 2**k``);
            built from the mapping by :meth:`create`.
    """

    base_patch_size: int
    thresholds: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.base_patch_size <= 0:
            raise ValueError(f"base patch size must be positive, got {self.base_patch_size}")
        values = tuple(_threshold_value(size, v) for size, v in zip(self.patch_sizes[1:], self.thresholds))
        object.__setattr__(self, "thresholds", values)  # frozen: normalise once, here

    @classmethod
    def create(cls, base_patch_size: int, thresholds: Mapping[int, float] | None) -> "PatchSchedule":
        """Validate a ``{patch_size: threshold}`` mapping (None: base patches only)."""
        base_patch_size = integer("patch_size", base_patch_size, 1)
        if thresholds is None:
            return cls(base_patch_size, ())
        if not isinstance(thresholds, Mapping):
            if isinstance(thresholds, Sequence) and not isinstance(thresholds, str):
                raise ValueError(
                    "thresholds must be a mapping {patch_size: threshold}; a sequence needs explicit "
                    "patch_sizes (ascending): convert it with "
                    "apt_dense.schedule.thresholds_from_sequence(thresholds, patch_sizes)"
                )
            raise TypeError(
                f"thresholds must be a mapping {{patch_size: threshold}}, got {type(thresholds).__name__}"
            )
        by_size: dict[int, object] = {}
        key_of: dict[int, object] = {}
        for key, value in thresholds.items():
            size = _patch_size_value(key, "thresholds key")
            if size in by_size:
                raise ValueError(f"thresholds give patch size {size} twice (keys {key_of[size]!r} and {key!r}); keep one")
            by_size[size], key_of[size] = value, key
        sizes = tuple(sorted(by_size))
        expected = tuple(base_patch_size << k for k in range(1, len(sizes) + 1))
        if sizes != expected:
            raise ValueError(
                f"thresholds must give one value for each patch size {expected} "
                f"(powers of two times the base size {base_patch_size}, no gaps); got sizes {sizes}"
            )
        return cls(base_patch_size, tuple(by_size[s] for s in sizes))

    @property
    def num_levels(self) -> int:
        """Number of coarse levels ``K`` (0 means base patches only)."""
        return len(self.thresholds)

    @property
    def patch_sizes(self) -> tuple[int, ...]:
        return tuple(self.base_patch_size << k for k in range(self.num_levels + 1))

    @property
    def largest_patch_size(self) -> int:
        return self.base_patch_size << self.num_levels

    def threshold_map(self) -> dict[int, float]:
        """The thresholds in their one public form, ``{patch_size: threshold}``."""
        return dict(zip(self.patch_sizes[1:], self.thresholds))


def thresholds_from_sequence(thresholds: Sequence[float], patch_sizes: Sequence[int]) -> dict[int, object]:
    """The mapping form of the public APT code's ascending list: ``thresholds[i]`` belongs to
    ``patch_sizes[i + 1]``. ``patch_sizes`` is ``(p, 2p, 4p, ...)``; values are checked by
    :meth:`PatchSchedule.create`."""
    if isinstance(thresholds, (Mapping, str)) or not isinstance(thresholds, Sequence):
        raise TypeError(
            f"thresholds_from_sequence converts an ascending sequence, got {type(thresholds).__name__}; "
            "a mapping {patch_size: threshold} needs no patch_sizes"
        )
    sizes = tuple(_patch_size_value(s, "patch_sizes") for s in patch_sizes)
    expected = tuple(sizes[0] << k for k in range(len(sizes))) if sizes else ()
    if not sizes or sizes != expected:
        raise ValueError(
            f"patch_sizes must be the base patch size times powers of two in ascending order, "
            f"i.e. {expected}; got {sizes}"
        )
    if len(thresholds) != len(sizes) - 1:
        raise ValueError(
            f"got {len(thresholds)} thresholds for patch sizes {sizes}: need exactly "
            f"{len(sizes) - 1}, one per size in {sizes[1:]} in ascending order"
        )
    return dict(zip(sizes[1:], thresholds))


def merged_config_thresholds(thresholds: Mapping[object, float] | None) -> Mapping[object, float] | None:
    """Thresholds as a config system's merge leaves them, with one entry per patch size.

    Overrides on a command line spell patch sizes as strings: mmengine's ``--cfg-options
    model.backbone.thresholds.32=1.0`` and detectron2's ``model.backbone.net.thresholds.32=1.0``
    add a key ``"32"`` after the config file's ``32`` instead of replacing it. The framework
    adapters pass their thresholds through here: of the keys that name one size, the later one,
    the override, wins (logged). :meth:`PatchSchedule.create` itself refuses such duplicates.
    """
    if not isinstance(thresholds, Mapping):
        return thresholds  # PatchSchedule.create names what is wrong
    by_size: dict[int, tuple[object, object]] = {}
    for key, value in thresholds.items():
        size = _patch_size_value(key, "thresholds key")
        if size in by_size:
            logger.info("thresholds: %r: %r overrides %r: %r (a config override)", key, value, *by_size[size])
        by_size[size] = (key, value)
    return dict(by_size.values())


def select_levels(scores: Sequence[torch.Tensor], thresholds: Sequence[float]) -> torch.Tensor:
    """Quadtree patch selection.

    Args:
        scores: ``scores[k-1]`` is ``(B, Hc / 2^k, Wc / 2^k)`` for ``k = 1..K``.
        thresholds: ``thresholds[k-1]`` for level ``k`` (:attr:`PatchSchedule.thresholds`).
    Returns:
        ``(B, Hc, Wc)`` int64 level of the patch covering each base cell: the coarsest ``k``
        whose patch scores below its threshold (tested independently per level), else 0.
    """
    if len(scores) != len(thresholds):
        raise ValueError(f"{len(scores)} score maps for {len(thresholds)} thresholds")
    if not scores:
        raise ValueError("select_levels needs at least one coarse level")
    level = torch.zeros_like(scores[-1], dtype=torch.int64)
    for k in range(len(scores), 0, -1):
        used = (scores[k - 1] < thresholds[k - 1]) & (level == 0)
        level = torch.where(used, k, level)
        level = level.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    return level


def _patch_size_value(value: object, what: str) -> int:
    """A patch size given as an int, or an int in disguise (``"32"``, ``np.int64(32)``, ``32.0``)."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    raise TypeError(
        f"{what} must be a patch size in pixels (an integer such as 32, or a string of digits "
        f"such as '32' from a JSON/YAML config), got {value!r} ({type(value).__name__})"
    )


def _threshold_value(size: int, value: object) -> float:
    """A finite threshold from a real scalar: Python, numpy or a 0-d torch tensor."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(
            f"threshold for {size} px patches must be a real number (int, float, numpy scalar or "
            f"0-d tensor), got {value!r} ({type(value).__name__})"
        )
    if not math.isfinite(value):
        raise ValueError(
            f"threshold for {size} px patches must be a finite number, got {value!r}; "
            "to never merge at a level use a threshold at or below the scorer's minimum "
            "(0 for entropy)"
        )
    return float(value)
