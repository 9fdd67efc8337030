"""Result files of the tools: checked before the work starts, written whole or not at all.

A tool that runs for minutes must not find out at the end that it cannot write its results, nor
leave a truncated file behind:

- :func:`check_output_file` and :func:`check_output_folder` run while the arguments are checked
  (a ``ValueError`` the tools turn into a one-line usage error): a folder where a file is
  expected, a file where a folder is expected, a folder that cannot be written or an unsupported
  suffix are found before any work. Missing folders are fine: they are created when writing.
- :func:`atomic_write` writes through a temporary file in the target's folder and renames it over
  the target only when it is complete, so a full disk, an error or Ctrl-C leaves the previous
  file (or none), never part of one.
- :func:`staged_folder` does the same for a folder of generated files: they are written in a
  temporary folder beside the target and moved in only when all are written.
- :func:`ctrl_c_deferred` holds Ctrl-C back while results are written: a second Ctrl-C after a
  first one stopped the work cannot cut the results short.

No framework or image-library imports: the writers (PIL, matplotlib, torch, json, csv) write to
the file object :func:`atomic_write` yields.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import IO

__all__ = ["check_output_file", "check_output_folder", "atomic_write", "staged_folder", "write_error", "ctrl_c_deferred"]


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (``Path.exists`` follows symlinks)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_folder(folder: Path, what: str) -> None:
    """``folder`` exists and can be written, or can be created inside a folder that can."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise ValueError(f"{what}: {existing} is a file, not a folder; choose a path in a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: cannot write in {existing} (read-only or no permission); choose another folder")


def check_output_file(path: str | os.PathLike, *, suffixes: Iterable[str] | None = None, what: str = "output") -> Path:
    """``path`` as a :class:`Path` if a file can be written there.

    Args:
        suffixes: the file name endings the writer supports (``".png"``), any when None.
        what: how the error names the path (the option, e.g. ``"--output"``).
    Raises:
        ValueError: naming the problem and the fix: ``path`` is a folder, its suffix is not
            supported, a component of its folder is a file, or its folder cannot be written.
    """
    path = Path(path)
    allowed = list(dict.fromkeys(s.lower() for s in suffixes)) if suffixes is not None else None
    if path.is_dir():
        example = path / ("result" + (allowed[0] if allowed else ""))
        raise ValueError(f"{what}: {path} is a folder; give a file name in it, e.g. {example}")
    if allowed is not None and path.suffix.lower() not in allowed:
        found = f"suffix {path.suffix!r} is not supported" if path.suffix else "has no suffix"
        raise ValueError(f"{what}: {path} {found}; end it in one of {', '.join(allowed)}")
    _check_writable_folder(path.parent, what)
    return path


def check_output_folder(path: str | os.PathLike, *, what: str = "output folder") -> Path:
    """``path`` as a :class:`Path` if it is, or can be created as, a writable folder.

    Raises:
        ValueError: ``path`` or one of its ancestors is a file, or it cannot be written.
    """
    path = Path(path)
    _check_writable_folder(path, what)
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` whole or not at all.

    Yields a file object (``mode`` ``"wb"`` or ``"w"``: UTF-8, newlines as written) of a new
    temporary file in ``path``'s folder (created if missing). When the block ends normally the
    file is flushed to disk and renamed over ``path``; when it raises (a full disk, an error,
    Ctrl-C), the temporary file is deleted and ``path`` is left as it was.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write writes new files: mode 'wb' or 'w', got {mode!r}")
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open honours the umask, so the result gets the permissions of any new file.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        text = {} if mode == "wb" else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as err:
        temporary.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename in (None, str(temporary)):
            err.filename, err.filename2 = str(path), None  # name the file the user asked for
        raise


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Fill ``path`` (created if missing) whole or not at all.

    Yields a new temporary folder beside ``path``. When the block ends normally, each of its
    entries replaces the entry of the same name in ``path`` (others there are kept); when it
    raises (a full disk, an error, Ctrl-C), the temporary folder is deleted and ``path`` is left
    as it was.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    stage = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    stage.mkdir()
    try:
        yield stage
        for entry in sorted(stage.iterdir()):
            target = path / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_error(err: OSError) -> str:
    """One line for an ``OSError`` of :func:`atomic_write`: the file and the reason."""
    return f"cannot write {err.filename}: {err.strerror or err}"


@contextlib.contextmanager
def ctrl_c_deferred(message: str = "Ctrl-C: finishing the result files first") -> Iterator[SimpleNamespace]:
    """Hold Ctrl-C (SIGINT) back inside the block, so the results written there are complete.

    Yields a namespace whose ``pressed`` turns True when Ctrl-C was pressed in the block (the
    first press prints ``message``); the caller then exits as interrupted. Outside the main
    thread, where signal handlers cannot be set, the block runs unprotected (writes stay atomic).
    """
    state = SimpleNamespace(pressed=False)
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def hold(signum, frame):
        if not state.pressed:
            print(message, file=sys.stderr, flush=True)
        state.pressed = True

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
