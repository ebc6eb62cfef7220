"""What a run writes as it goes: metrics.jsonl, events.jsonl, telemetry.jsonl, TensorBoard.

metrics and telemetry describe the current timeline: on resume, and on a rollback, the
records after the step training continues from are dropped (that progress is redone and
logged again). events.jsonl is history: nothing in it is ever dropped, so the rollback that
led to the current timeline, and the crash before a resume, stay on record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fp8lab.errors import FP8LabError
from fp8lab.fsutil import atomic_write


class JsonlWriter:
    """JSON lines, flushed per record so a killed run keeps what it logged."""

    def __init__(self, path: Path, *, keep_through_step: int | None, append: bool = False):
        """keep_through_step: keep the records up to this step (resume); None with
        append=False starts the file afresh; append=True keeps every record."""
        self.path = Path(path)
        if append and self.path.exists():
            self._rewrite(None)
        else:
            self._rewrite(keep_through_step if keep_through_step is not None else -1)
        self._f = open(self.path, "a", buffering=1)

    def _rewrite(self, keep_through_step: int | None) -> None:
        kept: list[str] = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a kill: everything after it is suspect
                if keep_through_step is None or rec.get("step", 0) <= keep_through_step:
                    kept.append(line)
        atomic_write(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def rewind(self, step: int) -> None:
        """Drop the records after `step` (a rollback returned there)."""
        self._f.close()
        self._rewrite(step)
        self._f = open(self.path, "a", buffering=1)

    def close(self) -> None:
        self._f.close()


class TensorBoardWriter:
    """Numeric fields as TensorBoard scalars under RUN/tensorboard."""

    @staticmethod
    def check_available() -> None:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise FP8LabError("logging.tensorboard=true needs the tensorboard package: "
                              "pip install 'fp8lab[tensorboard]'") from None

    def __init__(self, run_dir: Path, *, resume_step: int | None):
        self.dir = str(Path(run_dir) / "tensorboard")
        self._open(None if resume_step is None else resume_step + 1)

    def _open(self, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops the events logged at or after it by an attempt that died or was
        # rolled back.
        self._w = SummaryWriter(self.dir, purge_step=purge_step)

    def write(self, record: dict[str, Any], *, prefix: str = "") -> None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self._w.add_scalar(prefix + key, value, record["step"])

    def rewind(self, step: int) -> None:
        self._w.close()
        self._open(step + 1)

    def close(self) -> None:
        self._w.close()


class RunLogs:
    def __init__(self, run_dir: Path, *, resume_step: int | None, tensorboard: bool):
        run_dir = Path(run_dir)
        self.metrics = JsonlWriter(run_dir / "metrics.jsonl", keep_through_step=resume_step)
        self.telemetry = JsonlWriter(run_dir / "telemetry.jsonl", keep_through_step=resume_step)
        self.events = JsonlWriter(run_dir / "events.jsonl", keep_through_step=None, append=resume_step is not None)
        self.tb = TensorBoardWriter(run_dir, resume_step=resume_step) if tensorboard else None

    def step(self, record: dict) -> None:
        self.metrics.write(record)
        if self.tb is not None:
            self.tb.write(record)

    def layer_stats(self, step: int, records: list[dict]) -> None:
        for r in records:
            self.telemetry.write({"step": step, **r})
            if self.tb is not None:
                prefix = f"telemetry/{r['layer']}/{r['tensor']}/"
                self.tb.write({"step": step, "sqnr_db": r["sqnr_db"], "underflow_frac": r["underflow_frac"]},
                              prefix=prefix)

    def event(self, record: dict) -> None:
        self.events.write(record)

    def rewind(self, step: int) -> None:
        for sink in (self.metrics, self.telemetry, self.tb):
            if sink is not None:
                sink.rewind(step)

    def close(self) -> None:
        for sink in (self.metrics, self.telemetry, self.events, self.tb):
            if sink is not None:
                sink.close()


class NullLogs:
    """RunLogs for ranks other than 0 under torchrun: rank 0 writes the run's files."""

    def step(self, record: dict) -> None: ...
    def layer_stats(self, step: int, records: list[dict]) -> None: ...
    def event(self, record: dict) -> None: ...
    def rewind(self, step: int) -> None: ...
    def close(self) -> None: ...


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file, up to the first line that does not parse (a line
    cut by a kill: everything after it is suspect, as in JsonlWriter)."""
    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out
