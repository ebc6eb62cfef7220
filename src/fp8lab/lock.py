"""An exclusive lock on a directory (or anything else), held through a lock file.

    with DirLock(Path("data/out.lock"), what="output data/out"):
        ...  # no other process holds this lock meanwhile

The lock is `flock(LOCK_EX | LOCK_NB)` on the lock file: it never waits; when another process
holds it, `acquire` raises FP8LabError naming the lock file and the holder's PID and command
line, which the holder writes into the file. The kernel drops a flock when its holder dies, even
by kill -9, so a lock is never stuck: the next holder finds the file, locks it and overwrites
the dead holder's record. `release` deletes the file.

flock works on local filesystems; on NFS it depends on the server (Linux emulates it with
POSIX locks over NFSv4). This module is a leaf: it imports the standard library and
fp8lab.errors only, so anything in fp8lab can use it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

from fp8lab.errors import FP8LabError

_MAX_COMMAND = 300  # characters of the holder's command line kept: enough to recognise it


class Holder(NamedTuple):
    """What a lock file records about the process that took it."""

    pid: int
    command: str


class DirLock:
    """An exclusive, non-blocking lock held through the file `path`.

    `what` names the locked thing in error messages (e.g. "output data/out"). Use it as a
    context manager, or call acquire() and release(). It is not reentrant. The descriptor is
    close-on-exec, so programs this process starts do not keep the lock alive after it exits;
    a fork()ed child (a DataLoader worker, say) does share it until that child exits.
    """

    def __init__(self, path: str | os.PathLike, *, what: str | None = None) -> None:
        self.path = Path(path)
        self.what = what or str(self.path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True between a successful acquire() and release()."""
        return self._fd is not None

    def acquire(self) -> DirLock:
        """Take the lock now or raise FP8LabError naming its holder; returns self."""
        if self._fd is not None:
            raise FP8LabError(f"lock {self.path} is already held by this process; release it before acquiring again")
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise FP8LabError(self._held_message()) from None
                raise FP8LabError(f"could not lock {self.path}: {e.strerror or e}") from None
            # The previous holder deletes the file on release: if that happened between our
            # open and flock, we locked a deleted file that no one else will see; start over.
            if self._same_file(fd):
                break
            os.close(fd)
        self._fd = fd
        self._record()
        return self

    def release(self) -> None:
        """Delete the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Deleting while still locked: a waiter that opened the old file sees it is gone.
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # the lock goes with the descriptor below; a leftover file is harmless
        finally:
            os.close(fd)

    def holder(self) -> Holder | None:
        """The PID and command line recorded in the lock file, or None (no file, or no record).

        The record may be a dead holder's: the lock itself is held only while its process lives.
        """
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        pid, _, command = text.partition("\n")
        if not pid.strip().isdigit():
            return None
        return Holder(int(pid), command.strip())

    def probe(self) -> Holder | None:
        """Who holds the lock right now: its recorded Holder while a live process holds it,
        None when nobody does (no file, or a dead holder's). Creates and deletes nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return self.holder() or Holder(0, "")
            return None
        finally:
            os.close(fd)  # drops our probe's lock, if we got it
        return None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()

    def _open(self) -> int:
        try:
            # No O_TRUNC: the file may belong to the current holder, whose record we must keep.
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise FP8LabError(f"could not create lock file {self.path} for {self.what}: {_reason(e)}") from None

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _record(self) -> None:
        # One line, so the record stays two lines and error messages one.
        command = shlex.join([os.path.basename(sys.executable), *sys.argv]).replace("\n", "\\n")[:_MAX_COMMAND]
        data = f"{os.getpid()}\n{command}\n".encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError as e:
            self.release()
            raise FP8LabError(f"could not write lock file {self.path} for {self.what}: {_reason(e)}") from None

    def _held_message(self) -> str:
        h = self.holder()
        who = f"process {h.pid} ({h.command})" if h and h.command else f"process {h.pid}" if h else "another process"
        return f"{self.what} is in use: {who} holds the lock {self.path}; wait for it to finish or stop it"


def _reason(e: OSError) -> str:
    if e.errno == errno.EROFS:
        return "the filesystem is read-only"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; choose a location you can write to"
    return e.strerror or str(e)
