"""Child processes: the one way fp8lab launches them, and what the parent says when one
produced no result.

compare and bench run each recipe in its own process (its own memory peak, compile caches and
failures), the recipe check and doctor's collective probe run short-lived children. Every
child starts in its own session, so a time limit or a Ctrl-C takes down its whole process
group (torch.compile's worker processes included), never leaving orphans that hold the GPU.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Signals that mean "the user stopped it" (Ctrl-C, kill, a closed terminal), not "it broke".
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP reached the parent while it waited on a child; like Ctrl-C, it stops."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class ChildResult:
    returncode: int | None  # None: killed at the time limit
    output: str  # stdout (with stderr, unless kept apart); with `log` or `on_line`, the last lines only
    stderr: str
    wall_s: float


class Child:
    """A process in its own session; `kill()` ends its whole process group."""

    def __init__(self, cmd: list[str], *, env: dict | None = None, cwd: Path | None = None,
                 separate_stderr: bool = False):
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE if separate_stderr else subprocess.STDOUT, text=True,
                                     errors="replace", bufsize=1, start_new_session=True)

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # already gone

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait()

    def communicate(self, timeout_s: float | None) -> tuple[int | None, str, str]:
        """(returncode or None at the time limit, stdout, stderr); the group is killed at the limit."""
        try:
            out, err = self.proc.communicate(timeout=timeout_s)
            return self.proc.returncode, out or "", err or ""
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            out, err = self.proc.communicate()
            return None, out or "", err or ""


def run_child(cmd: list[str], *, env: dict | None = None, cwd: Path | None = None, timeout_s: float | None = None,
              log: Path | None = None, on_line: Callable[[str], None] | None = None, separate_stderr: bool = False,
              grace_s: float | None = 0.0, tail_lines: int = 200) -> ChildResult:
    """Run `cmd` to its end in its own session and return what it said.

    timeout_s: kill the whole group after this long (returncode None). log: append the output
    there as it comes (after a `$ cmd` line); on_line: called with each line as it comes.
    Ctrl-C, SIGTERM or SIGHUP reaching this process is passed on to the child's group, which
    then has `grace_s` seconds to finish (None: as long as it needs, e.g. to save a checkpoint;
    a second signal cuts it short) before it is killed; then the interrupt is raised here.
    """
    t0 = time.perf_counter()
    streaming = log is not None or on_line is not None
    with _signals_as_interrupts():
        child = Child(cmd, env=env, cwd=cwd, separate_stderr=separate_stderr and not streaming)
        try:
            if not streaming:
                rc, out, err = child.communicate(timeout_s)
                return ChildResult(rc, out, err, time.perf_counter() - t0)
            return _stream(child, cmd, timeout_s=timeout_s, log=log, on_line=on_line, tail_lines=tail_lines, t0=t0)
        except KeyboardInterrupt as e:
            _stop(child, getattr(e, "signum", signal.SIGINT), grace_s)
            raise
        finally:
            if child.proc.poll() is None:  # an error here, not in the child: leave nothing behind
                child.kill()


def _stream(child: Child, cmd: list[str], *, timeout_s, log, on_line, tail_lines: int, t0: float) -> ChildResult:
    tail: deque[str] = deque(maxlen=tail_lines)
    timed_out = threading.Event()

    def expire():
        timed_out.set()
        child.signal(signal.SIGKILL)

    timer = threading.Timer(timeout_s, expire) if timeout_s else None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", buffering=1) if log is not None else contextlib.nullcontext() as out:
        if out is not None:
            out.write(f"$ {' '.join(cmd)}\n")
        if timer:
            timer.start()
        try:
            for line in child.proc.stdout:
                tail.append(line)
                if out is not None:
                    out.write(line)
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            rc = child.proc.wait()
        finally:
            if timer:
                timer.cancel()
    return ChildResult(None if timed_out.is_set() else rc, "".join(tail), "", time.perf_counter() - t0)


def _stop(child: Child, signum: int, grace_s: float | None) -> None:
    """Pass the interrupt on, give the child its grace, then end the group."""
    child.signal(signum)
    try:
        child.proc.communicate(timeout=grace_s)  # drained, so a chatty child cannot block on its pipe
    except (subprocess.TimeoutExpired, KeyboardInterrupt, ValueError):  # a second Ctrl-C: at once
        pass
    child.kill()


class _signals_as_interrupts:
    """While a child runs, SIGTERM and SIGHUP raise Interrupted here (as Ctrl-C raises
    KeyboardInterrupt), so the child is stopped with us instead of orphaned; in the main
    thread only, where Python delivers signals."""

    def __enter__(self):
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) in (signal.SIG_DFL, None):
                    self.saved[sig] = signal.signal(sig, _raise_interrupted)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        return False


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


_ERROR_LINE = re.compile(r"^(fp8lab: error: |[\w.]*(Error|Exception|Interrupt)\b)")


def failure_reason(returncode: int | None, log: str, timeout_s: float | None) -> str:
    """One line saying why a worker produced no result: the last error line it printed."""
    if returncode is None:
        return f"timed out after {timeout_s:g} s (--timeout) and was killed"
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode).name
        except ValueError:
            sig = str(-returncode)
        extra = " (the kernel's out-of-memory killer?)" if returncode == -signal.SIGKILL else ""
        return f"killed by signal {sig}{extra}" + (f"; last output: {lines[-1][:200]}" if lines else "")
    err = next((ln for ln in reversed(lines) if _ERROR_LINE.match(ln)), lines[-1] if lines else "")
    return f"exit code {returncode}: {err[:400]}" if err else f"exit code {returncode}, no output"
