"""Fault points for crash drills and tests.

`FP8LAB_KILL_AT="<point>@<step>[:SIGNAL][,...]"` (test-only, environment) makes the process send
itself SIGKILL (or SIGNAL, e.g. TERM: a scheduler stopping the job) when it reaches that point
at that step: e.g. `ckpt-after-dcp@4` dies inside the write of checkpoint 4, after DCP wrote
its files and before anything else; `step-end@5:TERM,ckpt-after-dcp@5:TERM` sends SIGTERM after
step 5 and again inside the checkpoint that signal asked for. Points: step-end,
ckpt-after-dcp, ckpt-after-state, ckpt-after-manifest, ckpt-after-marker, ckpt-after-rename.
`FP8LAB_KILL_RANK=N` limits it to the torchrun rank N (a signal that reaches one rank only).
Unset (always, outside tests) it costs one dictionary lookup per point.
"""

from __future__ import annotations

import os
import signal

POINTS = ("step-end", "ckpt-after-dcp", "ckpt-after-state", "ckpt-after-manifest", "ckpt-after-marker",
          "ckpt-after-rename")
_TARGETS = dict(t.partition(":")[::2] for t in (os.environ.get("FP8LAB_KILL_AT") or "").split(",") if t)
if os.environ.get("FP8LAB_KILL_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
    _TARGETS = {}


def kill_point(point: str, step: int) -> None:
    if _TARGETS and (sig := _TARGETS.get(f"{point}@{step}")) is not None:
        os.kill(os.getpid(), signal.Signals[f"SIG{sig}"] if sig else signal.SIGKILL)
