"""What the parent of a child process says when the child produced no result: compare
and bench run each recipe in its own process and report a failure as a row, in one line."""

from __future__ import annotations

import re
import signal

# Signals that mean "the user stopped it" (Ctrl-C, kill, a closed terminal), not "it broke".
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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
