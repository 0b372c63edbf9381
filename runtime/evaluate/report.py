"""The comparison of N models side by side (base -> CPT -> SFT -> DPO, or any set of models): rows of
figures with a value per model and, when the first model is the baseline, each other model's change
from it; as a rich table for the terminal and as a Markdown file."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.markup import escape
from rich.table import Table

_METRICS = {
    "accuracy": "{} accuracy (%)",
    "official accuracy": "{} official accuracy (%)",
    "unparsed": "{} unparsed answers",
    "missing": "{} questions without a response",
    "perplexity": "{} text perplexity",
}
_HIGHER_IS_BETTER = {"accuracy", "official accuracy"}

# One benchmark or perplexity score of one model, as a results document holds it.
Score = Mapping[str, Any]


@dataclass(frozen=True)
class Row:
    """One compared figure with a value per model, None where a model lacks it: a benchmark's
    accuracy over all its questions (`kind` "accuracy", %, with `ci95` its 95% Wilson intervals),
    its accuracy as its official scorer divides ("official accuracy", %), the answers its official
    rule could not read ("unparsed") and the questions left without a response ("missing"), both
    counts, or a text set's perplexity ("perplexity")."""

    name: str
    kind: str
    detail: str
    values: tuple[float | None, ...]
    ci95: tuple[tuple[float, float] | None, ...]

    @property
    def metric(self) -> str:
        """The row's heading: what is measured, on what, in which unit."""
        return _METRICS[self.kind].format(self.name)

    @property
    def higher_is_better(self) -> bool:
        """True for accuracies; counts of unread answers and perplexities are better lower."""
        return self.kind in _HIGHER_IS_BETTER

    def change(self, index: int) -> float | None:
        """Model `index`'s value minus the first model's, None when either lacks the figure."""
        value, first = self.values[index], self.values[0]
        return None if value is None or first is None else value - first


@dataclass(frozen=True)
class Comparison:
    """Models side by side: `labels` head their columns in order; with `baseline` the first model
    is the one the others were adapted from, and the tables show each other model's change from it."""

    labels: tuple[str, ...]
    rows: tuple[Row, ...]
    baseline: bool


def compare(columns: Sequence[tuple[str, Mapping[str, Any]]], baseline: bool) -> Comparison:
    """The comparison of `columns`, each (label, a model's entry in a results document: its
    "benchmarks" and "perplexity" scores). Per benchmark, in first-seen order: accuracy, then
    official accuracy, unparsed answers and missing responses where some model has them; then a
    row per perplexity text set."""
    models = [entry for _, entry in columns]
    rows: list[Row] = []
    for name in _names(models, "benchmarks"):
        scores = [entry["benchmarks"].get(name) for entry in models]
        detail = _detail(scores, _accuracy_detail)
        rows.append(_row(name, "accuracy", detail, scores, lambda s: 100 * s["accuracy"], _percent_ci))
        rows += _answer_rows(name, scores)
    for name in _names(models, "perplexity"):
        scores = [entry["perplexity"].get(name) for entry in models]
        detail = _detail(scores, lambda s: f"{s['tokens']:,} tokens, windows of {s['seq_len']}")
        rows.append(_row(name, "perplexity", detail, scores, lambda s: s["perplexity"]))
    return Comparison(tuple(label for label, _ in columns), tuple(rows), baseline)


def markdown_table(comparison: Comparison) -> str:
    """A Markdown table: metric, detail, a column per model, then (with a baseline) each other
    model's change from the first."""
    # A model's name is user text: a "|" in it would end its cell.
    labels = [label.replace("|", "\\|") for label in (*comparison.labels, *_change_labels(comparison))]
    header = ["metric", "detail", *labels]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    for row in comparison.rows:
        cells = [row.metric, row.detail, *_values(row), *(_change(row, i) for i in _changed(comparison))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rich_table(comparison: Comparison) -> Table:
    """The same comparison for the terminal; changes for the better in green, worse in red."""
    table = Table(title="Evaluation")
    table.add_column("metric")
    table.add_column("detail", style="dim")
    for label in (*comparison.labels, *_change_labels(comparison)):
        table.add_column(escape(label), justify="right")
    for row in comparison.rows:
        changes = []
        for index in _changed(comparison):
            better = (row.change(index) or 0) * (1 if row.higher_is_better else -1)
            style = "green" if better > 0 else "red" if better < 0 else ""
            changes.append(f"[{style}]{_change(row, index)}[/]" if style else _change(row, index))
        table.add_row(row.metric, row.detail, *_values(row), *changes)
    return table


def _names(models: Sequence[Mapping[str, Any]], key: str) -> list[str]:
    return list(dict.fromkeys(name for entry in models for name in entry[key]))


def _detail(scores: Sequence[Score | None], describe: Callable[[Score], str]) -> str:
    """What the models' scores say about the figure; different descriptions are joined by "; "."""
    return "; ".join(dict.fromkeys(describe(s) for s in scores if s is not None))


def _row(
    name: str,
    kind: str,
    detail: str,
    scores: Sequence[Score | None],
    value: Callable[[Score], float | None],
    ci95: Callable[[Score], tuple[float, float]] | None = None,
) -> Row:
    return Row(
        name=name,
        kind=kind,
        detail=detail,
        values=tuple(None if s is None else value(s) for s in scores),
        ci95=tuple(None if s is None or ci95 is None else ci95(s) for s in scores),
    )


def _answer_rows(name: str, scores: Sequence[Score | None]) -> list[Row]:
    """Official accuracy, unparsed answers and missing responses, each only where some model has it."""
    given = [s for s in scores if s is not None]
    n = _detail(scores, lambda s: str(s["n"]))
    rows = []
    if any(s.get("official_accuracy") is not None for s in given):
        detail = "correct / valid answers, as the official scorer divides"
        rows.append(_row(name, "official accuracy", detail, scores, _official))
    if any(s.get("unparsed") is not None for s in given):
        supplied = any(s.get("missing") is not None for s in given)
        detail = f"of {n}, missing responses included" if supplied else f"of {n}"
        rows.append(_row(name, "unparsed", detail, scores, lambda s: s.get("unparsed")))
    if any(s.get("missing") for s in given):
        rows.append(_row(name, "missing", f"of {n}, scored as unparsed", scores, lambda s: s.get("missing")))
    return rows


def _accuracy_detail(score: Score) -> str:
    shots = "" if score["k_shot"] is None else f", {score['k_shot']}-shot"
    return f"n={score['n']}, {score['mode']}{shots}"


def _official(score: Score) -> float | None:
    return None if score.get("official_accuracy") is None else 100 * score["official_accuracy"]


def _percent_ci(score: Score) -> tuple[float, float]:
    return 100 * score["ci95"][0], 100 * score["ci95"][1]


def _changed(comparison: Comparison) -> range:
    """Indices of the models whose change from the first is shown."""
    return range(1, len(comparison.labels)) if comparison.baseline else range(0)


def _change_labels(comparison: Comparison) -> list[str]:
    if len(_changed(comparison)) == 1:
        return ["change"]
    return [f"change: {comparison.labels[i]}" for i in _changed(comparison)]


def _values(row: Row) -> list[str]:
    return [_value(row.kind, value, ci) for value, ci in zip(row.values, row.ci95, strict=True)]


def _value(kind: str, value: float | None, ci95: tuple[float, float] | None) -> str:
    if value is None:
        return ""
    if kind == "accuracy":
        return f"{value:.2f} [{ci95[0]:.1f}, {ci95[1]:.1f}]"
    if kind == "official accuracy":
        return f"{value:.2f}"
    if kind == "perplexity":
        return f"{value:.3f}"
    return f"{value:,.0f}"


def _change(row: Row, index: int) -> str:
    delta = row.change(index)
    if delta is None:
        return ""
    if row.kind in _HIGHER_IS_BETTER:
        return f"{delta:+.2f} pts"
    if row.kind == "perplexity":
        return f"{delta:+.3f} ({100 * delta / row.values[0]:+.1f}%)"
    return f"{delta:+,.0f}"
