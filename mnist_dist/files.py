"""Writing a run's files so that a reader (or a resume) never sees half of one.

Every file goes to a temporary sibling first, is flushed to the disk and renamed into place: a crash,
a full disk or a kill mid-write leaves the previous version (or nothing), never a torn file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_paths(*paths: Path) -> None:
    """Flush files (or folders: their entries) to the disk, so a rename never exposes lost data."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary sibling of ``path``, then rename it into place.
    On any failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        fsync_paths(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
