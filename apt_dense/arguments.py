"""Constructor argument checks shared by the core's modules.

Configs hand numbers over in many types: Python and numpy integers (YAML, numpy arithmetic),
floats where an integer was meant (``768 / 2``), strings from a command line. Each check accepts
the types that mean what the argument needs, returns the value as a plain ``int`` / ``float``,
and otherwise raises at construction with the argument's name and the fix, instead of a
traceback from inside torch at the first forward pass.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["integer", "real", "block_indices"]


def _described(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _integral_spelling(value: object) -> int | None:
    """The integer a float or a string spells (``64.0``, ``"2"``), else None."""
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def integer(name: str, value: object, minimum: int | None = None, hint: str = "") -> int:
    """``value`` as an ``int``: Python or numpy integers (not bools), at least ``minimum``.

    Args:
        hint: appended to the error when the value is below ``minimum`` (what to use instead).
    Raises:
        TypeError: not an integer; the message suggests the integer a float or string spells.
        ValueError: below ``minimum``.
    """
    if not _is_integer(value):
        spelled = _integral_spelling(value)
        fix = f"; write {name}={spelled}" if spelled is not None else ""
        raise TypeError(f"{name} must be an integer, got {_described(value)}{fix}")
    value = int(value)
    if minimum is not None and value < minimum:
        bound = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f"at least {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value}{'; ' + hint if hint else ''}")
    return value


def real(
    name: str,
    value: object,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    hint: str = "",
) -> float:
    """``value`` as a finite ``float`` (Python or numpy number, not a bool) in the given bounds.

    Args:
        above, at_least, below: open lower, closed lower and open upper bounds.
        hint: appended to a bound's error (what the argument means, what to use).
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {_described(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    limits = []
    if above is not None:
        limits.append((value > above, f"greater than {above:g}"))
    if at_least is not None:
        limits.append((value >= at_least, f"at least {at_least:g}"))
    if below is not None:
        limits.append((value < below, f"below {below:g}"))
    if not all(holds for holds, _ in limits):
        wanted = " and ".join(text for _, text in limits)
        raise ValueError(f"{name} must be {wanted}, got {value:g}{'; ' + hint if hint else ''}")
    return value


def block_indices(name: str, value: object, depth: int) -> tuple[int, ...]:
    """Block indices ``0 <= i < depth`` from a sequence of integers (or one integer)."""
    if _is_integer(value):
        value = (value,)
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        parts = value.strip("[]() ").split(",") if isinstance(value, str) else [value]
        spelled = [_integral_spelling(part) for part in parts]
        fix = f"; write {name}={spelled}" if None not in spelled else ""
        raise TypeError(f"{name} must be a list of block indices (integers), got {_described(value)}{fix}")
    entries = list(value)
    if not all(_is_integer(i) for i in entries):
        spelled = [int(i) if _is_integer(i) else _integral_spelling(i) for i in entries]
        wrong = next(i for i in entries if not _is_integer(i))
        fix = f"; write {name}={spelled}" if None not in spelled else ""
        raise TypeError(f"{name} must be block indices (integers), got {_described(wrong)} in {entries!r}{fix}")
    indices = tuple(int(i) for i in entries)
    outside = [i for i in indices if not 0 <= i < depth]
    if outside:
        raise ValueError(
            f"{name} {list(indices)} out of range for depth {depth}: blocks are numbered 0..{depth - 1}"
        )
    return indices
