"""Fault points for crash drills and tests.

`FP8LAB_KILL_AT="<point>@<step>[:SIGNAL]"` (test-only, environment) makes the process send
itself SIGKILL (or SIGNAL, e.g. TERM: a scheduler stopping the job) when it reaches that point
at that step: e.g. `ckpt-after-dcp@4` dies inside the write of checkpoint 4, after DCP wrote
its files and before anything else. Points: step-end,
ckpt-after-dcp, ckpt-after-state, ckpt-after-manifest, ckpt-after-marker, ckpt-after-rename.
Unset (always, outside tests) it costs one dictionary lookup per point.
"""

from __future__ import annotations

import os
import signal

POINTS = ("step-end", "ckpt-after-dcp", "ckpt-after-state", "ckpt-after-manifest", "ckpt-after-marker",
          "ckpt-after-rename")
_TARGET, _, _SIGNAL = (os.environ.get("FP8LAB_KILL_AT") or "").partition(":")


def kill_point(point: str, step: int) -> None:
    if _TARGET and _TARGET == f"{point}@{step}":
        os.kill(os.getpid(), signal.Signals[f"SIG{_SIGNAL}"] if _SIGNAL else signal.SIGKILL)
