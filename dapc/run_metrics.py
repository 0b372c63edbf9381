"""metrics.jsonl, read back: the trainer's records (`runtime/train/metrics.py`) as typed values. Torch-free.

One JSON object per line: `start` (each launch, resumed or not), `step`, `checkpoint`, `stopped`, `memory` (the
whole run's measured peak next to the plan's estimate), `export`, `end`. A resumed run appends, so a step that ran
twice (before a kill and after the resume) appears twice and its later record counts. A last line without its
newline is being written and is left out; any other line that is not a record is an error naming its line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dapc.errors import DapcError
from dapc.typed import Field, Model, ValidationError

__all__ = ["MemoryRecord", "MetricsError", "RunLog", "StartRecord", "StepRecord", "read_metrics"]

MAX_METRICS_BYTES = 1024**3  # a million steps of ~300-byte records fit three times over


class MetricsError(DapcError):
    """A metrics.jsonl that cannot be read, or a line in it that is not one of the trainer's records."""


class _Record(Model, extra="ignore", strict=True, finite=False):
    pass


class StepRecord(_Record):
    """One optimizer step as rank 0 logged it: loss and grad norm, lr, tokens so far, throughput over the steps
    since the last record (tokens/s, seconds per step, MFU), and the peak of the plan's memory counter (bytes,
    max over ranks)."""
    step: int = Field(ge=1)
    loss: float
    lr: float
    grad_norm: float
    tokens: int = Field(ge=0)
    tokens_per_second: float
    step_seconds: float
    mfu: float
    peak_memory_bytes: int = Field(ge=0)


class StartRecord(_Record):
    """A launch: the step it starts after, the checkpoint it resumed from, the plan and world size it ran."""
    step: int = Field(ge=0)
    steps: int
    resumed_from: str | None
    plan_sha256: str
    world_size: int
    resumed_world_size: int | None = None  # written since resuming on another world size exists


class StoppedRecord(_Record):
    step: int


class MemoryRecord(_Record):
    """The whole run's peak of `counter` (bytes, max over ranks) next to the plan's estimate."""
    counter: str
    measured_bytes: int
    estimated_bytes: int
    ratio: float


_TYPES = {"start": StartRecord, "step": StepRecord, "stopped": StoppedRecord, "memory": MemoryRecord}


@dataclass(frozen=True)
class Resume:
    """A launch that continued from a checkpoint: its start, and the steps before it that ran again after it."""
    start: StartRecord
    rerun_first: int | None  # first and last step logged twice, None when none was
    rerun_last: int | None


@dataclass(frozen=True)
class RunLog:
    """What metrics.jsonl says so far."""
    path: Path
    steps: tuple[StepRecord, ...]  # by step, each step's later record
    starts: tuple[StartRecord, ...]
    resumes: tuple[Resume, ...]
    stops: tuple[int, ...]  # steps after which a stop request ended a launch
    stopped: bool  # the latest launch ended on a stop request
    memory: MemoryRecord | None  # the latest launch's, once it finished
    ended: bool  # the latest launch wrote its `end` record
    partial_line: bool  # a last line still being written was left out
    modified_at: float  # the file's mtime, seconds since the epoch


def read_metrics(path: Path) -> RunLog:
    """Returns the records in metrics.jsonl at `path`. Raises MetricsError (located `path:line`) for a file that
    cannot be read or a complete line that is not a trainer record."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_METRICS_BYTES + 1)
        modified_at = path.stat().st_mtime
    except (OSError, ValueError) as e:
        raise MetricsError(f"cannot read the metrics: {getattr(e, 'strerror', None) or e}", str(path)) from e
    if len(data) > MAX_METRICS_BYTES:
        raise MetricsError(f"larger than {MAX_METRICS_BYTES // 1024**3} GiB: not a metrics log", str(path))
    lines = data.split(b"\n")
    partial = lines.pop() != b""  # after a final newline, split leaves b""
    steps: dict[int, StepRecord] = {}
    starts, resumes, stops, memory, ended, stopped = [], [], [], None, False, False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        event, record = _parse(line, f"{path}:{number}")
        if event == "start":
            if record.resumed_from is not None:
                again = [s for s in steps if s > record.step]
                resumes.append(Resume(record, min(again, default=None), max(again, default=None)))
            starts.append(record)
            memory, ended, stopped = None, False, False
        elif event == "step":
            steps[record.step] = record  # a step that ran again: the later record counts
        elif event == "stopped":
            stops.append(record.step)
            stopped = True
        elif event == "memory":
            memory = record
        elif event == "end":
            ended = True
    ordered = tuple(steps[s] for s in sorted(steps))
    return RunLog(path, ordered, tuple(starts), tuple(resumes), tuple(stops), stopped, memory, ended, partial,
                  modified_at)


def _parse(line: bytes, where: str):
    try:
        raw = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise MetricsError(f"not a metrics record: not JSON ({reason})", where) from e
    if not isinstance(raw, dict) or not isinstance(raw.get("event"), str):
        raise MetricsError("not a metrics record: no `event` name", where)
    event = raw["event"]
    kind = _TYPES.get(event)
    if kind is None:
        return event, None  # checkpoint, export, end, and records a later runtime adds
    try:
        return event, kind.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(record)"
        raise MetricsError(f"not a valid {event} record: {key}: {first['msg']}", where) from e
