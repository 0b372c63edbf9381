"""`dapc report RUN_DIR`: a run's progress, throughput and memory next to its plan, while it runs or after.

Reads RUN_DIR/plan.json (through `load_plan`) and the metrics.jsonl it names (`dapc.run_metrics`), says where the
run deviates from the plan (step time, tokens/s or memory beyond ±15%, stops and resumes, a loss that is not
finite), and writes charts (PNG) and report.md into RUN_DIR/report/. Torch-free; matplotlib is imported only to
draw the charts (`dapc.run_charts`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dapc.errors import DapcError
from dapc.memory import GIB
from dapc.plan_schema import Plan, load_plan
from dapc.planner import COMPONENTS
from dapc.run_metrics import RunLog, read_metrics

__all__ = ["DEVIATION_FRACTION", "RECENT_STEPS", "RunReport", "print_run_report", "report_json_text", "report_run"]

DEVIATION_FRACTION = 0.15  # the tolerance the measured-memory tests hold the plan to, used for every figure
RECENT_STEPS = 20  # step time: the median of the last 20 logged steps (a slow first step or a stall weighs less)
SILENT_STEPS = 10  # a running launch silent for 10 measured steps (and at least a minute) may have died
REPORT_FOLDER = "report"


@dataclass(frozen=True)
class RunReport:
    """The numbers `dapc report` prints: counts, seconds, tokens/s, bytes; None where not measured yet."""
    run_dir: str
    metrics_path: str
    name: str
    plan_sha256: str
    strategy: str
    world_size: int
    device: str
    status: str  # starting | running | stopped | finished
    step: int
    steps: int
    percent: float
    eta_seconds: float | None  # training steps only: remaining steps × measured step time
    tokens: int
    loss: float | None
    lr: float | None
    step_seconds: float | None  # median of the last RECENT_STEPS logged steps
    planned_step_seconds: float
    tokens_per_second: float | None  # the last step record's
    median_tokens_per_second: float | None
    planned_tokens_per_second: float
    mfu: float | None
    assumed_mfu: float
    memory_counter: str
    measured_peak_bytes: int | None  # max over ranks and over every launch
    planned_bytes: dict[str, int]  # memory.per_gpu_bytes: each component and total
    memory_ratio: float | None  # measured peak / planned total
    seconds_since_write: float
    deviations: tuple[str, ...]
    charts: tuple[str, ...] = ()
    report_md: str | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)


def report_run(run_dir: Path) -> RunReport:
    """Reads the run in `run_dir`, writes its charts and report.md into `run_dir`/report/, and returns the
    numbers. Raises DapcError (one located line) for a missing run folder, plan.json or metrics file, or an
    unreadable one; a run that has logged no step yet reports step 0."""
    if not run_dir.is_dir():
        raise DapcError("no run directory here" if not run_dir.exists() else "not a directory: give the run's "
                        "output folder (the one holding plan.json)", str(run_dir))
    plan_path = run_dir / "plan.json"
    if not plan_path.is_file():
        raise DapcError("no plan.json: not a run directory (`dapc render RECIPE -o DIR` writes one)", str(run_dir))
    plan = load_plan(plan_path)
    metrics_path = _metrics_path(plan, run_dir)
    if not metrics_path.exists():
        raise DapcError("no metrics yet: the trainer writes this file when the run starts (launch.sh, job.sbatch)",
                        str(metrics_path))
    log = read_metrics(metrics_path)
    from dapc.run_charts import write_report_files

    return write_report_files(summarize(plan, log, run_dir, time.time()), log, run_dir / REPORT_FOLDER)


def _metrics_path(plan: Plan, run_dir: Path) -> Path:
    """The plan's metrics file; in a run folder copied elsewhere, the copy beside its plan.json."""
    planned = Path(plan.paths.metrics_path)
    try:
        moved = run_dir / planned.relative_to(plan.paths.output_dir)
    except ValueError:
        return planned
    if run_dir.resolve() != Path(plan.paths.output_dir).resolve() and moved.exists():
        return moved
    return planned


def summarize(plan: Plan, log: RunLog, run_dir: Path, now: float) -> RunReport:
    """Returns the run's numbers next to the plan's, and its deviations, as of `now` (seconds since the epoch)."""
    steps = plan.cost.steps
    last = log.steps[-1] if log.steps else None
    step = last.step if last else (log.starts[-1].step if log.starts else 0)
    recent = log.steps[-RECENT_STEPS:]
    step_seconds = statistics.median(r.step_seconds for r in recent) if recent else None
    median_tps = statistics.median(r.tokens_per_second for r in recent) if recent else None
    peaks = [r.peak_memory_bytes for r in log.steps] + ([log.memory.measured_bytes] if log.memory else [])
    measured = max(peaks) if peaks else None
    planned = plan.memory.per_gpu_bytes.model_dump()
    status = _status(log, step, steps)
    numbers = RunReport(
        run_dir=str(run_dir), metrics_path=str(log.path), name=plan.recipe.name, plan_sha256=plan.plan_sha256,
        strategy=plan.strategy.name, world_size=plan.batch.world_size, device=plan.device.name, status=status,
        step=step, steps=steps, percent=100 * min(step, steps) / steps,
        eta_seconds=0.0 if step >= steps else (None if step_seconds is None else (steps - step) * step_seconds),
        tokens=last.tokens if last else step * plan.batch.global_batch_tokens,
        loss=last.loss if last else None, lr=last.lr if last else None,
        step_seconds=step_seconds, planned_step_seconds=plan.cost.step_seconds,
        tokens_per_second=last.tokens_per_second if last else None, median_tokens_per_second=median_tps,
        planned_tokens_per_second=plan.batch.global_batch_tokens / plan.cost.step_seconds,
        mfu=last.mfu if last else None, assumed_mfu=plan.cost.assumed_mfu, memory_counter=plan.memory.counter,
        measured_peak_bytes=measured, planned_bytes=planned,
        memory_ratio=None if measured is None else measured / planned["total"],
        seconds_since_write=max(0.0, now - log.modified_at), deviations=())
    return _with_deviations(numbers, plan, log)


def _status(log: RunLog, step: int, steps: int) -> str:
    if log.ended and step >= steps:
        return "finished"
    if log.stopped and log.ended:
        return "stopped"
    return "running" if log.steps else "starting"


def _with_deviations(n: RunReport, plan: Plan, log: RunLog) -> RunReport:
    found = []
    if n.step_seconds is not None and _beyond(n.step_seconds, n.planned_step_seconds):
        found.append(f"step time {n.step_seconds:.3g} s (median of the last {min(len(log.steps), RECENT_STEPS)} "
                     f"steps) vs {n.planned_step_seconds:.3g} s planned: {n.step_seconds / n.planned_step_seconds:.2f}×")
    if n.median_tokens_per_second is not None and _beyond(n.median_tokens_per_second, n.planned_tokens_per_second):
        found.append(f"throughput {n.median_tokens_per_second:,.0f} tokens/s (median) vs "
                     f"{n.planned_tokens_per_second:,.0f} planned: "
                     f"{n.median_tokens_per_second / n.planned_tokens_per_second:.2f}× (MFU {_percent(n.mfu)} "
                     f"vs {_percent(n.assumed_mfu)} assumed)")
    if n.memory_ratio is not None and _beyond(n.memory_ratio, 1.0):
        found.append(f"peak memory {_gib(n.measured_peak_bytes)} GiB ({n.memory_counter}) vs "
                     f"{_gib(n.planned_bytes['total'])} GiB planned: {n.memory_ratio:.2f}×, beyond "
                     f"±{DEVIATION_FRACTION:.0%}")
    found += [f"stopped after step {s} on request ({plan.runtime.preemption.stop_file})" for s in log.stops]
    for r in log.resumes:
        text = f"resumed after step {r.start.step} from {r.start.resumed_from}"
        if r.start.resumed_world_size not in (None, r.start.world_size):
            text += f", on {r.start.world_size} ranks (written on {r.start.resumed_world_size})"
        if r.rerun_first == r.rerun_last is not None:
            text += f"; step {r.rerun_first} ran twice, the later record counts"
        elif r.rerun_first is not None:
            text += f"; steps {r.rerun_first}–{r.rerun_last} ran twice, the later records count"
        found.append(text)
    bad = next((r.step for r in log.steps if not math.isfinite(r.loss)), None)
    if bad is not None:
        found.append(f"loss is not finite from step {bad} on")
    if log.starts and log.starts[-1].plan_sha256 != plan.plan_sha256:
        found.append(f"the latest launch ran plan_sha256 {log.starts[-1].plan_sha256[:12]}…, not this plan.json's "
                     f"{plan.plan_sha256[:12]}… (rendered again since?)")
    silent_after = max(60.0, SILENT_STEPS * (n.step_seconds or 0) * plan.recipe.training.log_every_steps)
    if n.status in ("starting", "running") and n.seconds_since_write > silent_after:
        found.append(f"no record for {n.seconds_since_write:,.0f} s (more than {silent_after:,.0f} s): the run may "
                     "have died; its launcher's log says")
    return _replace(n, deviations=tuple(found))


def _beyond(measured: float, planned: float) -> bool:
    return planned > 0 and abs(measured / planned - 1) > DEVIATION_FRACTION


def _replace(n: RunReport, **changes: Any) -> RunReport:
    return RunReport(**{**asdict(n), **changes})


def report_json_text(n: RunReport) -> str:
    """Returns the report as JSON text (sorted keys, a trailing newline); a non-finite number is null."""
    values = {k: v for k, v in asdict(n).items() if k != "warnings"}
    return json.dumps(_finite(values), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def summary_lines(n: RunReport) -> list[str]:
    """Returns the report's headline lines (plain text, no markup): one figure per line with its unit."""
    lines = [
        f"run: {n.name} ({n.run_dir}): {n.strategy} on {n.world_size} × {n.device}, plan {n.plan_sha256[:12]}",
        f"progress: step {n.step:,} of {n.steps:,} ({n.percent:.1f}%), {n.status}; {n.tokens:,} tokens; "
        f"ETA {_duration(n.eta_seconds)}" + (" (training steps only)" if n.eta_seconds else ""),
    ]
    if n.loss is not None:
        lines.append(f"loss: {n.loss:.4f} at lr {n.lr:.3g}")
    lines += [
        f"step time: {_seconds(n.step_seconds)} measured (median of recent steps), "
        f"{n.planned_step_seconds:.3g} s planned",
        f"throughput: {_rate(n.tokens_per_second)} tokens/s (last step), {_rate(n.median_tokens_per_second)} "
        f"median, {n.planned_tokens_per_second:,.0f} planned; MFU {_percent(n.mfu)} (plan assumed "
        f"{_percent(n.assumed_mfu)})",
    ]
    return lines


def memory_table(n: RunReport) -> Table:
    """Returns the table of planned bytes per GPU by component (GiB) with the measured peak beside the total."""
    table = Table(title=f"Memory per GPU ({escape(n.memory_counter)})", title_justify="left")
    for column in ("component", "planned GiB", "measured GiB", "measured/planned"):
        table.add_column(column, justify="left" if column == "component" else "right")
    for name in COMPONENTS:
        table.add_row(name, _gib(n.planned_bytes[name]), "", "")
    ratio = "" if n.memory_ratio is None else f"{n.memory_ratio:.2f}"
    table.add_row("[bold]total[/bold]", f"[bold]{_gib(n.planned_bytes['total'])}[/bold]",
                  "" if n.measured_peak_bytes is None else f"[bold]{_gib(n.measured_peak_bytes)}[/bold]", ratio)
    return table


def print_run_report(n: RunReport, console: Console) -> None:
    """Prints the report: headline lines, the memory table, the deviations, the files written."""
    # soft_wrap: a long line (a deep run path) stays one line, for a terminal to wrap and a script to read
    console.print(escape("\n".join(summary_lines(n))), highlight=False, soft_wrap=True)
    console.print(memory_table(n))
    if n.deviations:
        console.print("deviations from the plan:\n" + "\n".join(f"  - {escape(d)}" for d in n.deviations),
                      highlight=False, soft_wrap=True)
    else:
        console.print(f"deviations from the plan: none beyond ±{DEVIATION_FRACTION:.0%}", highlight=False)
    if n.report_md:
        names = ", ".join(Path(p).name for p in n.charts)
        console.print(escape(f"wrote {n.report_md}" + (f" and {names}" if names else "")), highlight=False,
                      soft_wrap=True)


def _gib(n_bytes: int | None) -> str:
    return "—" if n_bytes is None else f"{n_bytes / GIB:,.2f}"


def _percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.2f}%"


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _seconds(value: float | None) -> str:
    return "— (no step yet)" if value is None else f"{value:.3g} s"


def _duration(seconds: float | None) -> str:
    """Returns `seconds` as `1 h 02 min`, `3 min 05 s` or `12 s`; `unknown` before any step is measured."""
    if seconds is None:
        return "unknown (no step measured yet)"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
