"""What a run writes as it goes: metrics.jsonl, events.jsonl, telemetry.jsonl, and the optional
TensorBoard and Weights & Biases sinks.

metrics and telemetry describe the current timeline: on resume, and on a rollback, the
records after the step training continues from are dropped (that progress is redone and
logged again). events.jsonl is history: nothing in it is ever dropped, so the rollback that
led to the current timeline, and the crash before a resume, stay on record.
"""

from __future__ import annotations

import json
import secrets
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
        self.dropped = 0  # lines that were not JSON when the file was opened (see _rewrite)
        if append and self.path.exists():
            self._rewrite(None)
        else:
            self._rewrite(keep_through_step if keep_through_step is not None else -1)
        self._f = open(self.path, "a", buffering=1)

    def _rewrite(self, keep_through_step: int | None) -> None:
        kept: list[str] = []
        if self.path.exists():
            parsed = _parse_lines(self.path.read_text().splitlines())
            # The last line cut by a kill is expected; a bad line before others is damage, said once.
            self.dropped += sum(rec is None for _, rec in parsed[:-1])
            for line, rec in parsed:
                if rec is not None and (keep_through_step is None or rec.get("step", 0) <= keep_through_step):
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


def _parse_lines(lines: list[str]) -> list[tuple[str, dict | None]]:
    """(line, its record) for each non-blank line; None where the line is not a JSON object."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        out.append((line, rec if isinstance(rec, dict) else None))
    return out


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The fields of a record a dashboard plots: numbers, but not the step (the x axis) nor
    the batch checksum (an identifier)."""
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "data_crc")}


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
        for key, value in scalars(record).items():
            self._w.add_scalar(prefix + key, value, record["step"])

    def rewind(self, step: int) -> None:
        self._w.close()
        self._open(step + 1)

    def close(self) -> None:
        self._w.close()


class WandbWriter:
    """Numeric fields to a Weights & Biases run (logging.wandb, the `fp8lab[wandb]` extra).

    The W&B run id is kept in RUN/wandb_id, so a resumed fp8lab run continues its W&B run.
    Steps are logged against fp8lab's own step (`define_metric`), so the steps a resume or a
    rollback trains again are logged again rather than dropped; W&B cannot delete what the
    abandoned attempt logged, so its points stay (metrics.jsonl holds the current timeline).
    WANDB_MODE=offline (or disabled) and the other WANDB_* settings are W&B's own and honoured."""

    @staticmethod
    def check_available() -> None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise FP8LabError("logging.wandb=true needs the wandb package: pip install 'fp8lab[wandb]' "
                              "(set WANDB_MODE=offline to log without an account)") from None

    def __init__(self, run_dir: Path, *, project: str, config: dict):
        import wandb

        id_file = Path(run_dir) / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        atomic_write(id_file, run_id + "\n")
        self._run = wandb.init(project=project, id=run_id, resume="allow", dir=str(run_dir),
                               name=Path(run_dir).name, config=config)
        self._run.define_metric("*", step_metric="step")

    def write(self, record: dict[str, Any], *, prefix: str = "") -> None:
        self._run.log({prefix + k: v for k, v in scalars(record).items()} | {"step": record["step"]})

    def rewind(self, step: int) -> None:
        pass  # see the class docstring: the next steps are logged again against their step

    def close(self) -> None:
        self._run.finish()


class RunLogs:
    def __init__(self, run_dir: Path, *, resume_step: int | None, tensorboard: bool,
                 wandb: dict | None = None):
        """wandb: {"project": ..., "config": ...} to log to Weights & Biases too."""
        run_dir = Path(run_dir)
        self.metrics = JsonlWriter(run_dir / "metrics.jsonl", keep_through_step=resume_step)
        self.telemetry = JsonlWriter(run_dir / "telemetry.jsonl", keep_through_step=resume_step)
        # History: kept whole, also when a run restarts from scratch (no usable checkpoint).
        self.events = JsonlWriter(run_dir / "events.jsonl", keep_through_step=None, append=True)
        # Dashboards: numbers only, as they come.
        self.sinks = [*([TensorBoardWriter(run_dir, resume_step=resume_step)] if tensorboard else []),
                      *([WandbWriter(run_dir, **wandb)] if wandb else [])]

    def step(self, record: dict) -> None:
        self.metrics.write(record)
        for sink in self.sinks:
            sink.write(record)

    def layer_stats(self, step: int, records: list[dict]) -> None:
        for r in records:
            self.telemetry.write({"step": step, **r})
            prefix = f"telemetry/{r['layer']}/{r['tensor']}/"
            for sink in self.sinks:
                sink.write({"step": step, "sqnr_db": r["sqnr_db"], "underflow_frac": r["underflow_frac"]},
                           prefix=prefix)

    def event(self, record: dict) -> None:
        self.events.write(record)

    def dropped_lines(self) -> list[tuple[str, str]]:
        """(file name, what happened) for each log that held lines that were not JSON."""
        return [(w.path.name, f"{w.dropped} line(s) were not JSON (damaged?) and were dropped; the records after "
                              "them were kept") for w in (self.metrics, self.telemetry, self.events) if w.dropped]

    def rewind(self, step: int) -> None:
        for sink in (self.metrics, self.telemetry, *self.sinks):
            sink.rewind(step)

    def close(self) -> None:
        """Close every file and sink; a second call does nothing."""
        sinks, self.sinks = (self.metrics, self.telemetry, self.events, *self.sinks), []
        self.metrics = self.telemetry = self.events = None
        for sink in sinks:
            if sink is not None:
                sink.close()


class NullLogs:
    """RunLogs for ranks other than 0 under torchrun: rank 0 writes the run's files."""

    def step(self, record: dict) -> None: ...
    def layer_stats(self, step: int, records: list[dict]) -> None: ...
    def event(self, record: dict) -> None: ...
    def dropped_lines(self) -> list[tuple[str, str]]: return []
    def rewind(self, step: int) -> None: ...
    def close(self) -> None: ...


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file. A line that does not parse (the last one cut by a kill,
    or one damaged in the middle) is passed over; the records after it are kept."""
    return [rec for _, rec in _parse_lines(Path(path).read_text().splitlines()) if rec is not None]
