"""procs.run_child, the one launcher: a time limit ends the child's whole process group, its
output streams to a log and a callback, and an interrupt here is passed on to the child, which
may finish what it does (a trainer saving its checkpoint) before it is stopped."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from fp8lab.procs import Interrupted, failure_reason, run_child

# A child that starts a grandchild (as torch.compile's workers are) and writes its PID down.
FAMILY = """
import subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(str(g.pid))
print("started", flush=True)
time.sleep(600)
"""

# A child that, asked to stop, finishes its work first (as the trainer saves a checkpoint), with
# a worker of its own (as torch.compile has) that must still be there while it does.
POLITE = """
import signal, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
def stop(signum, frame):
    print("stopping", flush=True)
    time.sleep(0.5)  # the work it finishes
    open(sys.argv[1], "w").write(f"{signal.Signals(signum).name} worker={'alive' if worker.poll() is None else 'gone'}")
    sys.exit(3)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent, init here) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def test_a_time_limit_ends_the_whole_process_group(tmp_path):
    log = tmp_path / "child.log"
    got = run_child([sys.executable, "-c", FAMILY, str(tmp_path / "pid")], timeout_s=3, log=log)
    assert got.returncode is None and "started" in got.output
    assert "timed out after 3 s" in failure_reason(got.returncode, got.output, 3)
    grandchild = int((tmp_path / "pid").read_text())
    deadline = time.time() + 30
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)  # killed with its parent, not orphaned
    assert log.read_text().startswith("$ ") and "started" in log.read_text()


def test_output_comes_back_and_streams_line_by_line(tmp_path):
    lines = []
    got = run_child([sys.executable, "-c", "print('a'); print('b'); raise SystemExit(4)"], on_line=lines.append)
    assert got.returncode == 4 and lines == ["a", "b"] and got.output == "a\nb\n"
    plain = run_child([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"],
                      separate_stderr=True)
    assert (plain.returncode, plain.output, plain.stderr) == (0, "out\n", "err\n")


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupt_here_is_passed_on_and_the_child_may_finish(tmp_path, how):
    said = tmp_path / "said"

    def interrupt():
        time.sleep(1.5)  # the child is up and waiting by then
        os.kill(os.getpid(), signal.SIGINT if how == "ctrl-c" else signal.SIGTERM)  # as the terminal or a scheduler

    threading.Thread(target=interrupt, daemon=True).start()
    lines = []
    with pytest.raises(KeyboardInterrupt) as e:
        run_child([sys.executable, "-c", POLITE, str(said)], on_line=lines.append, grace_s=None, timeout_s=120)
    # It finished its work first, its worker still alive meanwhile, and what it said then came through.
    assert said.read_text() == ("SIGINT" if how == "ctrl-c" else "SIGTERM") + " worker=alive"
    assert lines == ["ready", "stopping"]
    assert isinstance(e.value, Interrupted) == (how == "sigterm")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler was only for the wait
