"""Durable file writes shared by data preparation, checkpoints and run directories, and the one
way their OSErrors become a line the user can act on."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from fp8lab.errors import FP8LabError

# Out of space in any sense: the disk, the quota, or the file size limit (`ulimit -f`, or the
# filesystem's largest file; with SIGXFSZ ignored a write past RLIMIT_FSIZE fails with EFBIG).
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def os_error(e: OSError, *, path: str | Path, action: str = "write", nbytes: int | None = None,
             elsewhere: str = "choose another output with -o") -> FP8LabError:
    """The FP8LabError for `e`, raised while trying to `action` `path` (`nbytes` long, if known);
    `elsewhere` says how to pick another location."""
    what = f"could not {action} {path}"
    if e.errno in NO_SPACE:
        size = f" while writing {nbytes:,} bytes" if nbytes is not None else ""
        return FP8LabError(f"{what}: {e.strerror or 'no space left'}{size}; free space on that filesystem (or raise "
                           f"the file size limit, `ulimit -f`) or {elsewhere}, then run again")
    if e.errno == errno.EROFS:
        return FP8LabError(f"{what}: the filesystem is read-only; {elsewhere}, on a writable one")
    if e.errno in (errno.EACCES, errno.EPERM):
        return FP8LabError(f"{what}: permission denied; {elsewhere}, somewhere you can write to")
    if e.errno in (errno.ENOTDIR, errno.EEXIST) and action == "create directory":
        return FP8LabError(f"{what}: part of that path is an existing file, not a directory; {elsewhere}")
    return FP8LabError(f"{what}: {e.strerror or e}")


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
    """Replace `path` with `text` so a reader sees the old or the new file, never half. A failed
    write (a full disk) leaves the old file and no temporary one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_durable(tmp, text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
