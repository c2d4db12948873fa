"""Files that appear whole or not at all: written beside their final name, then renamed onto it.

The weights cache, config.json files and fine-tuning checkpoints are all written this way, so an
interrupted write (a killed process, a full disk) never leaves a partial file under the final name.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["part_file", "atomic_write"]


def _file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the process umask."""
    # NOTE: os.umask can only be read by setting it; it is set straight back
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def part_file(path: str | os.PathLike) -> Path:
    """A new empty file beside `path`, `.NAME.<random>.part` (this process's own), with the mode `open()`
    would give `path` (not mkstemp's 0600: a shared cache stays readable); the folder is made if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    os.chmod(name, _file_mode())
    return Path(name)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` a part file of `path`, then rename it onto `path`; if `write` (or the rename) fails,
    the part file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = part_file(path)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())  # (writers that make their own file, as safetensors does, give it 0600)
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # (a read-only folder must not hide the error that got here)
            pass
    return path
