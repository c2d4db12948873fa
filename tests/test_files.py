"""mvit_zoo.files: whole files or none, with the mode open() would give them."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mvit_zoo.files import atomic_write, part_file
from mvit_zoo.weights.hub import save_safetensors


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o640
    finally:
        os.umask(old)


def test_atomic_write_replaces_whole(tmp_path: Path, umask_027: int) -> None:
    path = tmp_path / "sub" / "a.txt"
    assert atomic_write(path, lambda tmp: tmp.write_text("one")) == path
    atomic_write(path, lambda tmp: tmp.write_text("two"))
    assert path.read_text() == "two" and os.listdir(path.parent) == ["a.txt"]
    assert path.stat().st_mode & 0o777 == umask_027  # not mkstemp's 0600


def test_a_failed_write_leaves_the_old_file_and_no_part_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("old")

    def half(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_part_files_are_this_process_own(tmp_path: Path, umask_027: int) -> None:
    a, b = part_file(tmp_path / "w.bin"), part_file(tmp_path / "w.bin")
    assert a != b and a.name.startswith(".w.bin.") and a.name.endswith(".part")
    assert a.stat().st_mode & 0o777 == umask_027


def test_cached_weights_get_the_umask_mode(tmp_path: Path, umask_027: int) -> None:
    """A shared weights cache stays readable by the group the umask allows."""
    path = save_safetensors({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert path.stat().st_mode & 0o777 == umask_027
