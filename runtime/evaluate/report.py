"""The comparison of a model with the model it was adapted from: rows with deltas, as a rich table
for the terminal and as a Markdown file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.table import Table


@dataclass(frozen=True)
class Row:
    """One compared figure: a benchmark's accuracy (`kind` "accuracy", a percentage with its 95%
    interval) or a text set's perplexity (`kind` "perplexity"). `base` and `delta` are None
    without a model to compare to."""

    name: str
    kind: str
    detail: str
    adapted: float
    adapted_ci95: tuple[float, float] | None
    base: float | None
    base_ci95: tuple[float, float] | None

    @property
    def metric(self) -> str:
        return f"{self.name} accuracy (%)" if self.kind == "accuracy" else f"{self.name} text perplexity"

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "accuracy"

    @property
    def delta(self) -> float | None:
        return None if self.base is None else self.adapted - self.base


def comparison_rows(results: dict[str, Any]) -> list[Row]:
    """A row per benchmark (accuracy, %) and per perplexity text set, from a results document."""
    adapted = results["models"]["model"]
    base = results["models"].get("compare_to")
    rows = []
    for name, score in adapted["benchmarks"].items():
        other = base["benchmarks"][name] if base else None
        rows.append(
            Row(
                name=name,
                kind="accuracy",
                detail=f"n={score['n']}, {score['mode']}, {score['k_shot']}-shot",
                adapted=100 * score["accuracy"],
                adapted_ci95=_percent(score["ci95"]),
                base=100 * other["accuracy"] if other else None,
                base_ci95=_percent(other["ci95"]) if other else None,
            )
        )
    for name, score in adapted["perplexity"].items():
        other = base["perplexity"][name] if base else None
        rows.append(
            Row(
                name=name,
                kind="perplexity",
                detail=f"{score['tokens']:,} tokens, windows of {score['seq_len']}",
                adapted=score["perplexity"],
                adapted_ci95=None,
                base=other["perplexity"] if other else None,
                base_ci95=None,
            )
        )
    return rows


def markdown_table(rows: list[Row], model_label: str, base_label: str | None) -> str:
    """A Markdown table: metric, the base model, the adapted model and the change."""
    header = ["metric", "detail", *([f"base: {base_label}"] if base_label else []), f"model: {model_label}"]
    header += ["change"] if base_label else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    for row in rows:
        cells = [row.metric, row.detail]
        if base_label:
            cells.append(_value(row.base, row.base_ci95))
        cells.append(_value(row.adapted, row.adapted_ci95))
        if base_label:
            cells.append(_change(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rich_table(rows: list[Row], model_label: str, base_label: str | None) -> Table:
    """The same comparison for the terminal; changes for the better in green, worse in red."""
    table = Table(title="Evaluation")
    table.add_column("metric")
    table.add_column("detail", style="dim")
    if base_label:
        table.add_column(f"base: {base_label}", justify="right")
    table.add_column(f"model: {model_label}", justify="right")
    if base_label:
        table.add_column("change", justify="right")
    for row in rows:
        cells = [row.metric, row.detail]
        if base_label:
            cells.append(_value(row.base, row.base_ci95))
        cells.append(_value(row.adapted, row.adapted_ci95))
        if base_label:
            better = (row.delta or 0) * (1 if row.higher_is_better else -1)
            style = "green" if better > 0 else "red" if better < 0 else ""
            cells.append(f"[{style}]{_change(row)}[/]" if style else _change(row))
        table.add_row(*cells)
    return table


def _percent(interval: list[float]) -> tuple[float, float]:
    return 100 * interval[0], 100 * interval[1]


def _value(value: float | None, ci95: tuple[float, float] | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f} [{ci95[0]:.1f}, {ci95[1]:.1f}]" if ci95 else f"{value:.3f}"


def _change(row: Row) -> str:
    if row.delta is None:
        return ""
    if row.kind == "accuracy":
        return f"{row.delta:+.2f} pts"
    return f"{row.delta:+.3f} ({100 * row.delta / row.base:+.1f}%)"
