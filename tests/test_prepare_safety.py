"""`fp8lab prepare` when the run is stopped or the output is a problem: SIGTERM and Ctrl-C clean
up, kill -9 leftovers are removed by the next run, OUT.lock keeps two runs apart, and a full
disk, a read-only place or a file at -o give one line (exit 2) and leave nothing behind.

The signal and file-size-limit cases run the real CLI in a child process; the rest run in
this process on real files."""

from __future__ import annotations

import errno
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_helpers import listing, make_docs, write_jsonl
from fp8lab.cli import main
from fp8lab.data import prepare as prep
from fp8lab.data.prepare import prepare_dataset
from fp8lab.fsutil import os_error
from fp8lab.lock import DirLock
from helpers import cli_env, tree_digest

# Many small shards (each one fsynced) keep the child busy for seconds after its first shard.
SLOW_ARGS = ["--seq-len", "64", "--shard-tokens", "4096", "--progress", "off"]


def _big_input(d: Path) -> Path:
    return write_jsonl(d / "big.jsonl", make_docs(400, seed=11) * 6)


def _start_prepare(tmp_path: Path, src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fp8lab", "prepare", "-i", str(src), "-o", str(out), *SLOW_ARGS],
                            env=cli_env(tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_shards(proc: subprocess.Popen, tmp: Path, timeout: float = 60) -> None:
    """Until the child has written a shard into its temporary output."""
    deadline = time.monotonic() + timeout
    while not (tmp.is_dir() and any(tmp.glob("train_*.bin"))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the child wrote no shard in time"
        time.sleep(0.005)


def test_sigterm_removes_the_temporary_output_and_exits_143(tmp_path):
    src, out = _big_input(tmp_path), tmp_path / "out"
    proc = _start_prepare(tmp_path, src, out)
    tmp = tmp_path / f"out.tmp-{proc.pid}"
    _wait_for_shards(proc, tmp)
    assert DirLock(tmp_path / "out.lock").holder().pid == proc.pid  # the run holds the output's lock
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == prep.SIGTERM_EXIT == 143
    assert err.strip() == (f"fp8lab: prepare stopped by SIGTERM; its temporary output was removed; run it again to "
                           f"prepare {out}")
    assert listing(tmp_path) == ["big.jsonl"]  # no out, no out.tmp-PID, no out.lock


def test_kill_9_leftovers_are_removed_by_the_next_run(tmp_path):
    src, out = _big_input(tmp_path), tmp_path / "out"
    proc = _start_prepare(tmp_path, src, out)
    tmp = tmp_path / f"out.tmp-{proc.pid}"
    _wait_for_shards(proc, tmp)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert tmp.is_dir() and (tmp_path / "out.lock").exists()  # nothing could clean up after kill -9
    assert DirLock(tmp_path / "out.lock").holder().pid == proc.pid

    write_jsonl(tmp_path / "small.jsonl", make_docs(40, seed=12))
    report = prepare_dataset(inputs=[str(tmp_path / "small.jsonl")], out=out, seq_len=16, val_fraction=0.1)
    assert report.notes[0] == (f"removed out.tmp-{proc.pid} beside {out}: temporary output of a prepare run that "
                               "no longer runs (killed)")
    assert listing(tmp_path) == ["big.jsonl", "out", "small.jsonl"]


def test_temporary_outputs_of_live_writers_are_kept(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", make_docs(40, seed=13))
    (tmp_path / "out.tmp-1").mkdir()  # PID 1 always runs: maybe a writer that does not take the lock
    (tmp_path / "out.tmp-notapid").mkdir()
    report = prepare_dataset(inputs=[str(tmp_path / "d.jsonl")], out=tmp_path / "out", seq_len=16, val_fraction=0.1)
    assert not any("removed" in n for n in report.notes)
    assert listing(tmp_path) == ["d.jsonl", "out", "out.tmp-1", "out.tmp-notapid"]


class _Hook(prep.Progress):
    """Calls `action` on the third progress step, when shards have already been written."""

    def __init__(self, action) -> None:
        self.action, self.calls = action, 0

    def advance(self, *, nbytes, tokens):
        self.calls += 1
        if self.calls == 3:
            self.action()


def test_sigterm_in_process_raises_terminated_and_restores_the_handler(tmp_path, monkeypatch):
    from fp8lab.data import readers

    write_jsonl(tmp_path / "d.jsonl", make_docs(300, seed=4))
    monkeypatch.setattr(readers, "CHUNK_BYTES", 5000)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        def sigterm():
            # Never signal ourselves with the default action in place: that would end pytest.
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            assert DirLock(tmp_path / "out.lock").holder().pid == os.getpid()
            os.kill(os.getpid(), signal.SIGTERM)

        with pytest.raises(prep.Terminated):
            prepare_dataset(inputs=[str(tmp_path / "d.jsonl")], out=tmp_path / "out", seq_len=16, shard_tokens=1700,
                            progress=_Hook(sigterm))
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert listing(tmp_path) == ["d.jsonl"]


def test_second_run_on_a_locked_output_names_the_holder(tmp_path, capsys):
    write_jsonl(tmp_path / "d.jsonl", make_docs(40, seed=14))
    with DirLock(tmp_path / "out.lock"):
        before = tree_digest(tmp_path)
        assert main(["prepare", "-i", str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert tree_digest(tmp_path) == before
    assert err.startswith(f"fp8lab: error: output {tmp_path / 'out'} is in use: process {os.getpid()} (")
    assert f"holds the lock {tmp_path / 'out.lock'}" in err and "\n" not in err
    assert listing(tmp_path) == ["d.jsonl"]


def _limit_file_size(limit: int):
    def preexec():
        # Ignored SIGXFSZ turns a write past RLIMIT_FSIZE into EFBIG, as a full disk gives ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", make_docs(400, seed=15))  # about 300 KB of tokens per split
    env = {**cli_env(tmp_path / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "fp8lab", "prepare", "-i", str(tmp_path / "d.jsonl"),
                           "-o", str(tmp_path / "out"), "--seq-len", "64"], env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=_limit_file_size(64 << 10))
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stderr
    shard = re.escape(f"{tmp_path}/out.tmp-") + r"\d+/train_00000\.bin\.tmp"
    assert re.fullmatch(rf"fp8lab: error: could not write {shard}: File too large while writing [\d,]+ bytes; "
                        r"free space on that filesystem .*, then run again", err), err
    assert listing(tmp_path) == ["d.jsonl"]


def test_os_error_from_a_real_size_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN  # Python ignores it at startup
    path = Path(os.environ["FP8LAB_CACHE"]) / "big.bin"
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError) as e, open(path, "wb") as f:
            f.write(b"x" * 10000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        path.unlink(missing_ok=True)
    assert e.value.errno == errno.EFBIG
    msg = str(os_error(e.value, path=path, nbytes=10000))
    assert msg.startswith(f"could not write {path}: File too large while writing 10,000 bytes; free space")


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create entries in: chmod 0o555, or /sys for root (root
    ignores permission bits; sysfs refuses new files to everyone)."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir(mode=0o555)
        return d
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root without sysfs: no directory refuses writes")
    return Path("/sys")


def test_unwritable_output_location(tmp_path, capsys):
    write_jsonl(tmp_path / "d.jsonl", make_docs(40, seed=16))
    out = _unwritable_dir(tmp_path) / "fp8lab-test-out"
    assert main(["prepare", "-i", str(tmp_path / "d.jsonl"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fp8lab: error: could not create lock file {out}.lock for output {out}: permission denied; "
                   "choose a location you can write to")
    assert not out.exists()
    with pytest.raises(OSError) as e:
        os.mkdir(out)
    assert "permission denied; choose another output with -o, somewhere you can write to" in str(
        os_error(e.value, path=out, action="create directory"))


def test_output_that_is_a_file(tmp_path, capsys):
    write_jsonl(tmp_path / "d.jsonl", make_docs(40, seed=17))
    (tmp_path / "taken").write_text("mine")
    before = tree_digest(tmp_path)
    for out, needle in ((tmp_path / "taken", f"output {tmp_path / 'taken'} is an existing file, not a directory"),
                        (tmp_path / "taken" / "sub", f"could not create directory {tmp_path / 'taken'}: part of that "
                                                     "path is an existing file")):
        assert main(["prepare", "-i", str(tmp_path / "d.jsonl"), "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"fp8lab: error: {needle}") and "\n" not in err, err
    assert tree_digest(tmp_path) == before
