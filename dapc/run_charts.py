"""The files of `dapc report`: PNG charts and report.md in RUN_DIR/report/. matplotlib (Agg) is imported here,
and only when there is a step to draw."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

from dapc.memory import GIB
from dapc.planner import COMPONENTS
from dapc.run_metrics import RunLog
from dapc.run_report import DEVIATION_FRACTION, RunReport, summary_lines

__all__ = ["CHARTS", "write_report_files"]

# file → (alt text in report.md, what it draws)
CHARTS = {"loss.png": "Loss and learning rate by step", "throughput.png": "Tokens/s by step, and the plan's",
          "memory.png": "Peak memory by step, and the plan's total"}
_SIZE_INCHES, _DPI = (7.0, 3.6), 100  # 700 × 360 pixels, a few tens of KB each


def write_report_files(n: RunReport, log: RunLog, folder: Path) -> RunReport:
    """Writes the charts (once a step is logged, where matplotlib is installed) and report.md into `folder`;
    returns `n` with their paths, and a warning for what could not be written."""
    warnings: list[str] = []
    charts: list[str] = []
    try:
        folder.mkdir(exist_ok=True)
        if log.steps and importlib.util.find_spec("matplotlib") is None:
            warnings.append("charts skipped: matplotlib is not installed (pip install matplotlib)")
        elif log.steps:
            charts = _draw(n, log, folder)
        report_md = folder / "report.md"
        report_md.write_text(_markdown(n, charts), encoding="utf-8")
    except OSError as e:
        return replace(n, warnings=(f"cannot write {folder}: {e.strerror or e}; the report is printed only",))
    return replace(n, charts=tuple(charts), report_md=str(report_md), warnings=tuple(warnings))


def _draw(n: RunReport, log: RunLog, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [r.step for r in log.steps]
    style = {"marker": "o", "markersize": 3} if len(steps) <= 50 else {}
    paths = []
    for name, draw in (("loss.png", _loss), ("throughput.png", _throughput), ("memory.png", _memory)):
        figure, ax = plt.subplots(figsize=_SIZE_INCHES)
        draw(ax, n, log, steps, style)
        for resume in log.resumes:  # where a launch continued from a checkpoint
            ax.axvline(resume.start.step, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        figure.tight_layout()
        path = folder / name
        figure.savefig(path, dpi=_DPI)
        plt.close(figure)
        paths.append(str(path))
    return paths


def _loss(ax, n: RunReport, log: RunLog, steps: list[int], style: dict) -> None:
    ax.plot(steps, [r.loss for r in log.steps], color="C0", label="loss", **style)
    ax.set_ylabel("loss")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r.lr for r in log.steps], color="C1", linestyle="--", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper right")
    ax.set_title(f"{n.name}: loss and learning rate, step {n.step:,} of {n.steps:,}")


def _throughput(ax, n: RunReport, log: RunLog, steps: list[int], style: dict) -> None:
    ax.plot(steps, [r.tokens_per_second for r in log.steps], color="C0", label="measured", **style)
    _planned(ax, n.planned_tokens_per_second, "planned")
    ax.set_ylabel("tokens/s")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")
    ax.set_title(f"{n.name}: throughput over {n.world_size} rank{'s' if n.world_size > 1 else ''}")


def _memory(ax, n: RunReport, log: RunLog, steps: list[int], style: dict) -> None:
    ax.plot(steps, [r.peak_memory_bytes / GIB for r in log.steps], color="C0", label=f"measured peak "
            f"({n.memory_counter}, max over ranks)", **style)
    _planned(ax, n.planned_bytes["total"] / GIB, "planned total")
    ax.set_ylabel("GiB per GPU")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")
    ax.set_title(f"{n.name}: memory per GPU")


def _planned(ax, value: float, label: str) -> None:
    ax.axhline(value, color="C2", linestyle="--", label=label)
    ax.axhspan(value * (1 - DEVIATION_FRACTION), value * (1 + DEVIATION_FRACTION), color="C2", alpha=0.12,
               label=f"±{DEVIATION_FRACTION:.0%}")


def _markdown(n: RunReport, charts: list[str]) -> str:
    lines = [f"# Run report: {n.name}", "", *(f"- {line}" for line in summary_lines(n)), "",
             f"| memory per GPU ({n.memory_counter}) | planned GiB | measured GiB |", "|---|---:|---:|"]
    lines += [f"| {name} | {_gib(n.planned_bytes[name])} | |" for name in COMPONENTS]
    measured = "" if n.measured_peak_bytes is None else f"{_gib(n.measured_peak_bytes)} ({n.memory_ratio:.2f}×)"
    lines += [f"| **total** | {_gib(n.planned_bytes['total'])} | {measured} |", "", "## Deviations from the plan", ""]
    lines += [f"- {d}" for d in n.deviations] or [f"None beyond ±{DEVIATION_FRACTION:.0%}."]
    if charts:
        lines += ["", "## Charts", ""] + [f"![{CHARTS[Path(p).name]}]({Path(p).name})" for p in charts]
    return "\n".join(lines) + "\n"


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:,.2f}"
