"""The one way files and folders are written: into a temporary sibling, then renamed into place.

A reader never sees a half-written file, checkpoint or cache entry: after a crash or Ctrl-C there is
either the old content or the new, plus at most a hidden ``.NAME.tmp-*`` leftover that is never read.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from voxcpm_core.errors import VoxCPMError


def _sibling(path: Path, kind: str) -> Path:
    """A hidden, unique name beside ``path`` (same file system, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to make the file at a temporary path, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_output_dir(out_dir: Path, overwrite: bool = False) -> None:
    """An output directory must be new or empty unless ``overwrite`` (checked again by ``atomic_dir``)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (overwrite or (out_dir.is_dir() and not any(out_dir.iterdir()))):
        raise VoxCPMError(f"{out_dir}: already exists; choose a new output directory or remove it first")


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out_dir``, on failure it is deleted."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out_dir, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if overwrite and out_dir.exists():
            old = _sibling(out_dir, "old")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, out_dir)  # replaces an empty folder, fails on one filled meanwhile
            except OSError:
                check_output_dir(out_dir)  # another writer got there first: say so in one line
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
