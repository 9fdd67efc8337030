"""The image loop of the quality tools (``tools/depth_quality.py``, ``tools/sam_quality.py``): dense
and APT compared one image at a time with a progress line each; Ctrl-C keeps the images done; the
results are written whole (:mod:`apt_dense.outputs`) with Ctrl-C held back while writing.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np

from .outputs import ctrl_c_deferred, write_error

__all__ = ["compare_images", "write_and_exit_status", "run_comparisons"]

R = TypeVar("R")


def compare_images(
    images: Iterable[tuple[str, np.ndarray]], count: int, compare: Callable[[str, np.ndarray], tuple[R | None, str]]
) -> tuple[list[R], bool]:
    """``(results, interrupted)``: ``compare(name, image)`` for each image, which returns its
    result (None: the image is skipped) and what its progress line ``[i/count] name: ...`` says.
    Ctrl-C stops the loop and keeps the results so far.

    Raises:
        ValueError: from ``images`` (no readable image in a folder).
    """
    results: list[R] = []
    try:
        for index, (name, image) in enumerate(images, start=1):
            result, line = compare(name, image)
            if result is not None:
                results.append(result)
            print(f"[{index}/{count}] {name}: {line}", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted: writing the {len(results)} images done so far")
        return results, True
    return results, False


def write_and_exit_status(results: list, interrupted: bool, write: Callable[[], str]) -> int:
    """Write the results with ``write`` (which returns the closing line to print) and give the
    tool's exit status: 0, 1 (nothing compared, or the files could not be written) or 130 (Ctrl-C
    stopped the loop or was pressed while writing)."""
    if not results:
        print("error: no image was compared", file=sys.stderr)
        return 130 if interrupted else 1
    with ctrl_c_deferred() as ctrl_c:
        try:
            line = write()
        except OSError as err:
            print(f"error: {write_error(err)}", file=sys.stderr)
            return 1
    print(line)
    return 130 if interrupted or ctrl_c.pressed else 0


def run_comparisons(
    images: Iterable[tuple[str, np.ndarray]], count: int, compare: Callable[[str, np.ndarray], tuple[R | None, str]],
    write: Callable[[list[R]], str],
) -> int:
    """A quality tool's whole loop: :func:`compare_images`, then ``write(results)`` (which
    returns the closing line) through :func:`write_and_exit_status`; a folder without a
    readable image is one error line. Returns the tool's exit status."""
    try:
        results, interrupted = compare_images(images, count, compare)
    except ValueError as err:  # no readable image in the folder
        print(f"error: {err}", file=sys.stderr)
        return 1
    return write_and_exit_status(results, interrupted, lambda: write(results))
