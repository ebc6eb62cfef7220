"""fp8lab.lock.DirLock: one holder at a time, the holder named when it is taken, and a holder
killed with -9 leaves nothing stuck. Real flock on real files; the other holders are real
processes (flock also excludes a second open of the file in the same process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from fp8lab.errors import FP8LabError
from fp8lab.lock import DirLock, Holder
from helpers import SRC

HOLD = (
    "import sys, time; from fp8lab.lock import DirLock; DirLock(sys.argv[1]).acquire(); "
    "print('ready', flush=True); time.sleep(60)"
)


def _holder_process(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_acquire_records_holder_and_release_removes_the_file(tmp_path):
    path = tmp_path / "run.lock"
    lock = DirLock(path, what="run directory r1")
    assert lock.holder() is None and not lock.held
    with lock:
        assert lock.held
        h = lock.holder()
        # the command line this process was started with (pytest's, or an xdist worker's)
        assert isinstance(h, Holder) and h.pid == os.getpid() and os.path.basename(sys.argv[0]) in h.command
        assert path.read_text().splitlines()[0] == str(os.getpid())
    assert not path.exists() and not lock.held
    lock.release()  # idempotent
    with DirLock(path):  # free again
        pass


def test_second_holder_is_refused_with_path_and_pid(tmp_path):
    path = tmp_path / "out.lock"
    with DirLock(path, what="output out"):
        with pytest.raises(FP8LabError) as e:
            DirLock(path, what="output out").acquire()
        msg = str(e.value)
        assert msg.startswith("output out is in use") and str(path) in msg and f"process {os.getpid()} " in msg
        assert "\n" not in msg
        assert path.exists()  # the refused attempt leaves the holder's file alone
    assert not path.exists()


def test_not_reentrant(tmp_path):
    lock = DirLock(tmp_path / "x.lock").acquire()
    with pytest.raises(FP8LabError, match="already held by this process"):
        lock.acquire()
    lock.release()


def test_holder_killed_with_sigkill_leaves_nothing_stuck(tmp_path):
    path = tmp_path / "out.lock"
    proc = _holder_process(path)
    try:
        with pytest.raises(FP8LabError, match=rf"process {proc.pid} \(.*\) holds the lock {path}"):
            DirLock(path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert DirLock(path).holder().pid == proc.pid  # the dead holder's record is still there...
    with DirLock(path) as lock:  # ...but the kernel dropped its flock: taken, record overwritten
        assert lock.holder().pid == os.getpid()


def test_unwritable_location_is_one_clear_line(tmp_path):
    with pytest.raises(FP8LabError, match=r"could not create lock file .*missing.*: No such file or directory"):
        DirLock(tmp_path / "missing" / "x.lock").acquire()
