"""Stopping on a scheduler's signal without losing work.

SLURM, Kubernetes and spot instances stop a job with SIGTERM (SLURM can send SIGUSR1 some time
before its limit: `#SBATCH --signal=USR1@120`), a closed terminal sends SIGHUP. The first such
signal asks the trainer to stop at the next step boundary: it saves a verified checkpoint there
and exits with PREEMPTED_EXIT, which says "rerun the same command to resume". A second signal
ends the process at once (as soon as Python runs again: a collective stuck on a dead peer waits
for the scheduler's SIGKILL), by the signal's default action; the checkpoint being written then
is incomplete and passed over on resume, and the newest complete one is untouched (checkpoints
are written into a temporary folder and renamed into place).

Under torchrun the request travels with the step's loss all-reduce, so every rank stops after
the same step whichever rank was signalled.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from fp8lab.errors import FP8LabError

# sysexits.h EX_TEMPFAIL, "a temporary failure; the user is invited to retry": what a stopped,
# resumable run is. Schedulers' requeue hooks and `fp8lab compare` read it so.
PREEMPTED_EXIT = 75


class Preempted(FP8LabError):
    """The run stopped on a signal after saving its checkpoint; the message says how to resume."""

    exit_code = PREEMPTED_EXIT
    prefix = "stopped"


# Schedulers often deliver one stop twice: under SLURM both slurmstepd and torchrun's agent send
# SIGTERM to each worker, and `fp8lab compare` passes its own on to its child. The same signal
# again within this many seconds is the same request; a user's second `kill` comes later.
REPEAT_WINDOW_S = 1.0


class StopRequest:
    """While active (a context manager), the first of `signals` sets `signum`; a later one (a
    different signal, or the same one after REPEAT_WINDOW_S) restores the default action and
    re-sends itself, ending the process at once. Signals the process ignores (`nohup` ignores
    SIGHUP) stay ignored. The handler only records: the trainer speaks at the step boundary
    (printing from a signal handler can interrupt a print in progress)."""

    def __init__(self, signals: list[str]):
        self.signals = [signal.Signals[name] for name in signals]  # names checked by config (STOP_SIGNALS)
        self.signum: int | None = None
        self._at = 0.0
        self._saved: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._at = signum, now
        elif signum != self.signum or now - self._at > REPEAT_WINDOW_S:  # a second stop: at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # where Python delivers signals
            for sig in self.signals:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()
        return False
