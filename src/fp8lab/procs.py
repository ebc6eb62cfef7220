"""Child processes: the one way fp8lab launches them, and what the parent says when one
produced no result.

compare and bench run each recipe in its own process (its own memory peak, compile caches and
failures), the recipe check and doctor's collective probe run short-lived children. Every
child starts in its own session, so a time limit or a Ctrl-C takes down its whole process
group (torch.compile's worker processes included), never leaving orphans that hold the GPU.
"""

from __future__ import annotations

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
    Ctrl-C, SIGTERM or SIGHUP reaching this process is passed on to the child (to the child
    alone: its own workers, torch.compile's say, must outlive its cleanup), which then has
    `grace_s` seconds to finish (None: as long as it needs, e.g. to save a checkpoint; a second
    signal cuts it short), its output still streaming; then the group is killed and the
    interrupt raised here.
    """
    t0 = time.perf_counter()
    streaming = log is not None or on_line is not None
    with _signals_as_interrupts():
        child = Child(cmd, env=env, cwd=cwd, separate_stderr=separate_stderr and not streaming)
        try:
            if not streaming:
                try:
                    rc, out, err = child.communicate(timeout_s)
                except KeyboardInterrupt as e:
                    child.proc.send_signal(getattr(e, "signum", signal.SIGINT))
                    _wait(child, grace_s, child.proc.wait)  # these children say little: no pipe fills
                    raise
                return ChildResult(rc, out, err, time.perf_counter() - t0)
            with _Output(cmd, log=log, on_line=on_line, tail_lines=tail_lines) as output:
                timer = _Killer(child, timeout_s)
                try:
                    output.pump(child)
                except KeyboardInterrupt as e:
                    child.proc.send_signal(getattr(e, "signum", signal.SIGINT))
                    _wait(child, grace_s, lambda: output.pump(child))
                    raise
                finally:
                    timer.cancel()
                rc = child.proc.wait()
            return ChildResult(None if timer.fired else rc, output.text(), "", time.perf_counter() - t0)
        finally:
            if child.proc.poll() is None:  # an error or an interrupt here: leave nothing behind
                child.kill()


def _wait(child: Child, grace_s: float | None, drain: Callable[[], object]) -> None:
    """Let a child that was asked to stop finish (draining its output, so a chatty child cannot
    block on its pipe) for `grace_s` seconds (None: no limit); a second interrupt ends it."""
    timer = _Killer(child, grace_s)
    try:
        drain()
    except (KeyboardInterrupt, ValueError):  # a second Ctrl-C or signal: at once
        pass
    finally:
        timer.cancel()
        child.kill()


class _Killer:
    """Kills the child's whole group after `seconds` (None: never), from a timer thread."""

    def __init__(self, child: Child, seconds: float | None):
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire, args=(child,)) if seconds is not None else None
        if self._timer is not None:
            self._timer.start()

    def _fire(self, child: Child) -> None:
        self.fired = True
        child.signal(signal.SIGKILL)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class _Output:
    """Where a streaming child's lines go: a log file, a callback, and the tail kept for the result."""

    def __init__(self, cmd: list[str], *, log: Path | None, on_line, tail_lines: int):
        self.cmd, self.log, self.on_line = cmd, log, on_line
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self._f = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> "_Output":
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.log, "a", buffering=1)
            self._f.write(f"$ {' '.join(self.cmd)}\n")
        return self

    def pump(self, child: Child) -> None:
        """Pass on every line until the child exits. Lines are read on a thread, so the wait ends
        when the child does, not when its pipe closes: a worker it leaves behind may hold that
        open (the group is killed afterwards, which closes it)."""
        if self._reader is None:  # after an interrupt, the second call waits on the same reader
            self._reader = threading.Thread(target=self._read, args=(child,), daemon=True)
            self._reader.start()
        child.proc.wait()
        child.signal(signal.SIGKILL)  # what it left behind goes with it
        self._reader.join()

    def _read(self, child: Child) -> None:
        for line in child.proc.stdout:
            self.tail.append(line)
            if self._f is not None:
                self._f.write(line)
            if self.on_line is not None:
                self.on_line(line.rstrip("\n"))

    def text(self) -> str:
        return "".join(self.tail)

    def __exit__(self, *exc) -> bool:
        if self._f is not None:
            self._f.close()
        return False


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
