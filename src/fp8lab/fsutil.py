"""Durable file writes shared by data preparation, checkpoints and run directories."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable; some filesystems refuse to open directories,
    which is fine (they make renames durable by other means)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    """Write and fsync `path` in place (for files inside a folder that is renamed later)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` with `text` so a reader sees the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_durable(tmp, text)
    os.replace(tmp, path)
    fsync_dir(path.parent)
