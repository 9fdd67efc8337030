"""Patch-size schedule: which patch sizes exist and the score threshold of each coarse size.

Thresholds are given in one explicit form, a mapping ``{patch_size: threshold}`` for every size
coarser than the base patch, e.g. ``{32: 2.0, 64: 2.0, 128: 0.3}`` (the paper's detection
setting). A sequence is also accepted and is read in *ascending* patch-size order:
``thresholds[i]`` belongs to ``patch_sizes[i + 1]``.

Configs often carry numbers in other types: JSON and YAML mapping keys are strings
(``{"32": 2.0}``), and values may be numpy or 0-d torch scalars. Patch sizes that are integers in
disguise (``"32"``, ``np.int64(32)``, ``32.0``) and thresholds that are real scalars are accepted
and converted to ``int`` / ``float``; anything else is rejected with the offending value named.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["PatchSchedule"]


@dataclass(frozen=True)
class PatchSchedule:
    """Patch sizes ``base * 2**k`` for ``k = 0..num_levels`` and one threshold per ``k >= 1``.

    A level-``k`` patch is used where its score is strictly below ``thresholds[k - 1]`` and no
    coarser used patch covers it.
    """

    base_patch_size: int
    thresholds: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.base_patch_size <= 0:
            raise ValueError(f"base patch size must be positive, got {self.base_patch_size}")
        values = tuple(_threshold_value(size, v) for size, v in zip(self.patch_sizes[1:], self.thresholds))
        object.__setattr__(self, "thresholds", values)  # frozen: normalise once, here

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
        return dict(zip(self.patch_sizes[1:], self.thresholds))

    @classmethod
    def create(
        cls,
        base_patch_size: int,
        thresholds: Mapping[int, float] | Sequence[float] | None,
        patch_sizes: Sequence[int] | None = None,
    ) -> "PatchSchedule":
        """Validate user input and build a schedule.

        Args:
            base_patch_size: the host ViT's patch size ``p``.
            thresholds: ``{patch_size: threshold}`` for every size in ``patch_sizes[1:]``, or a
                sequence in ascending patch-size order, or None for base patches only.
            patch_sizes: optional explicit sizes ``(p, 2p, 4p, ...)``; derived from a mapping's
                keys when omitted.
        """
        if patch_sizes is not None:
            patch_sizes = tuple(_patch_size_value(s, "patch_sizes") for s in patch_sizes)
            expected = tuple(base_patch_size << k for k in range(len(patch_sizes)))
            if patch_sizes != expected:
                raise ValueError(
                    f"patch_sizes must be the base patch size times powers of two in ascending "
                    f"order, i.e. {expected}; got {patch_sizes}"
                )
        if thresholds is None:
            if patch_sizes is not None and len(patch_sizes) > 1:
                raise ValueError(
                    f"patch_sizes {patch_sizes} need thresholds for {patch_sizes[1:]}, got None"
                )
            return cls(base_patch_size, ())
        if isinstance(thresholds, Mapping):
            by_size: dict[int, object] = {}
            key_of: dict[int, object] = {}
            for key, value in thresholds.items():
                size = _patch_size_value(key, "thresholds key")
                if size in by_size:
                    raise ValueError(
                        f"thresholds give patch size {size} twice (keys {key_of[size]!r} and {key!r}); keep one"
                    )
                by_size[size], key_of[size] = value, key
            sizes = sorted(by_size)
            if patch_sizes is None:
                patch_sizes = tuple(base_patch_size << k for k in range(len(sizes) + 1))
            if tuple(sizes) != patch_sizes[1:]:
                raise ValueError(
                    f"thresholds must give one value for each patch size {patch_sizes[1:]} "
                    f"(powers of two times the base size {base_patch_size}, no gaps); "
                    f"got sizes {tuple(sizes)}"
                )
            values = tuple(by_size[s] for s in patch_sizes[1:])
        elif isinstance(thresholds, Sequence) and not isinstance(thresholds, str):
            values = tuple(thresholds)
            if patch_sizes is None:
                raise ValueError(
                    "a threshold sequence needs explicit patch_sizes (ascending); or pass a "
                    "mapping {patch_size: threshold}"
                )
            if len(values) != len(patch_sizes) - 1:
                raise ValueError(
                    f"got {len(values)} thresholds for patch sizes {patch_sizes}: need exactly "
                    f"{len(patch_sizes) - 1}, one per size in {patch_sizes[1:]} in ascending order"
                )
        else:
            raise TypeError(
                f"thresholds must be a mapping {{patch_size: threshold}} or a sequence, got "
                f"{type(thresholds).__name__}"
            )
        return cls(base_patch_size, values)


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
