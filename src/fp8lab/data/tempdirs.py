"""Leftovers of DatasetWriter builds: OUT.tmp-PID folders beside an output, and which of them a
killed writer left (kill -9 and power loss run no cleanup; the next prepare on OUT does)."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

from fp8lab.data.dataset import TMP_INFIX


def temp_dirs(out_dir: Path) -> dict[Path, int]:
    """{temporary directory: writer PID} of every DatasetWriter build of `out_dir` found beside it."""
    found = {}
    for p in out_dir.parent.glob(f"{glob.escape(out_dir.name)}{TMP_INFIX}*"):
        pid = p.name[len(out_dir.name) + len(TMP_INFIX) :]
        if pid.isdigit() and p.is_dir() and not p.is_symlink():
            found[p] = int(pid)
    return found


def remove_stale_temps(out_dir: Path) -> list[Path]:
    """Delete the temporary directories of `out_dir` whose writer process is gone (kill -9, power
    loss: nothing could clean up); return them. A live PID's directory is left alone, even if
    the PID was reused by an unrelated process: wrongly keeping costs disk, wrongly deleting
    would break a running writer. PIDs are this machine's (and this PID namespace's)."""
    removed = []
    for path, pid in sorted(temp_dirs(out_dir).items()):
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    except OverflowError:
        return False
    return True
