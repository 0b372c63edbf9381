"""A PNG chart of a comparison of N models: accuracies with their 95% intervals, and perplexities."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen before pyplot loads)

from runtime.evaluate.report import Comparison, Row  # noqa: E402

# Width of the bars of one figure, all models together, in x-axis units (one unit per figure).
_GROUP_WIDTH = 0.8
_PANEL_WIDTH_INCHES = 6
# Room for one legend entry (a model's name), inches: sets how many fit on a legend row.
_LEGEND_ENTRY_INCHES = 2
_PANELS = (
    ("accuracy over all questions (%), 95% Wilson interval", "accuracy"),
    ("perplexity (lower is better)", "perplexity"),
)


def write_chart(comparison: Comparison, path: Path) -> Path:
    """Bar charts with a bar per model, in the comparison's order, side by side for each figure:
    accuracy (%) with error bars, and perplexity; a model without a figure has no bar there.
    Returns `path`."""
    panels = [(title, group) for title, kind in _PANELS if (group := [r for r in comparison.rows if r.kind == kind])]
    width_inches = _PANEL_WIDTH_INCHES * len(panels)
    figure, axes = plt.subplots(1, len(panels), figsize=(width_inches, 4.4), squeeze=False)
    count = len(comparison.labels)
    width = _GROUP_WIDTH / count
    for ax, (title, group) in zip(axes[0], panels, strict=True):
        for index, label in enumerate(comparison.labels):
            shift = (index - (count - 1) / 2) * width
            xs, values, errors = _bars(group, index)
            # The same colour for a model in every panel, and one legend entry per model.
            ax.bar([x + shift for x in xs], values, width, yerr=errors, capsize=3, label=label, color=f"C{index}")
        ax.set_xticks(range(len(group)), [row.name for row in group])
        ax.set_title(title)
    handles = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    columns = min(count, max(1, width_inches // _LEGEND_ENTRY_INCHES))
    legend_rows = -(-count // columns)
    figure.legend(list(handles.values()), list(handles), loc="lower center", ncol=columns)
    figure.tight_layout(rect=(0, 0.03 + 0.06 * legend_rows, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _bars(group: list[Row], index: int) -> tuple[list[int], list[float], list[list[float]] | None]:
    """Model `index`'s bars: x positions, heights, and error bars when every bar has an interval."""
    bars = [(x, row.values[index], row.ci95[index]) for x, row in enumerate(group) if row.values[index] is not None]
    if not bars or not all(ci for _, _, ci in bars):
        return [x for x, _, _ in bars], [v for _, v, _ in bars], None
    # max(0, ...): at 0% or 100% the Wilson bound equals the value up to float rounding
    low = [max(0.0, value - ci[0]) for _, value, ci in bars]
    high = [max(0.0, ci[1] - value) for _, value, ci in bars]
    return [x for x, _, _ in bars], [v for _, v, _ in bars], [low, high]
