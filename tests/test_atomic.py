"""The one atomic writer (voxcpm_core.io.atomic): all or nothing, no leftovers, no clobbering."""

from __future__ import annotations

import pytest

from voxcpm_core.errors import VoxCPMError
from voxcpm_core.io.atomic import atomic_dir, atomic_write, atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "old")

    def crash(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_text() == "old" and [p.name for p in path.parent.iterdir()] == ["a.txt"]


def test_a_folder_filled_during_the_write_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(VoxCPMError, match="already exists"), atomic_dir(out) as tmp:
        (tmp / "mine.txt").write_text("mine")
        out.mkdir()  # another process finishes first
        (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left

    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "mine.txt").write_text("mine")
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
