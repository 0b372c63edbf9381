"""A PNG chart of a comparison: accuracies with their 95% intervals, and perplexities."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen before pyplot loads)

from runtime.evaluate.report import Row  # noqa: E402

_WIDTH = 0.38


def write_chart(rows: list[Row], path: Path, model_label: str, base_label: str | None) -> Path:
    """Bar charts, base beside adapted: accuracy (%) with error bars, and perplexity; returns
    `path`."""
    panels = [
        (title, group)
        for title, kind in (
            ("accuracy (%), 95% Wilson interval", "accuracy"),
            ("perplexity (lower is better)", "perplexity"),
        )
        if (group := [row for row in rows if row.kind == kind])
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.4), squeeze=False)
    for ax, (title, group) in zip(axes[0], panels, strict=True):
        names = [row.name for row in group]
        xs = range(len(group))
        series = [(base_label, "base", -_WIDTH / 2)] if base_label else []
        series.append((model_label, "adapted", _WIDTH / 2 if base_label else 0))
        for label, which, shift in series:
            values = [getattr(row, which) for row in group]
            intervals = [getattr(row, f"{which}_ci95") for row in group]
            errors = (
                [
                    # max(0, ...): at 0% or 100% the Wilson bound equals the value up to float rounding
                    [max(0.0, v - ci[0]) for v, ci in zip(values, intervals, strict=True)],
                    [max(0.0, ci[1] - v) for v, ci in zip(values, intervals, strict=True)],
                ]
                if all(intervals)
                else None
            )
            ax.bar([x + shift for x in xs], values, _WIDTH, yerr=errors, capsize=4, label=label)
        ax.set_xticks(list(xs), names)
        ax.set_title(title)
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=2)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
