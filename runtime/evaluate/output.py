"""Writing an evaluation: results.json, comparison.md and comparison.png, and the table on the terminal;
the same for models scored here and for responses scored from files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from runtime.evaluate.chart import write_chart
from runtime.evaluate.report import compare, markdown_table, rich_table

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class EvaluationResult:
    """What an evaluation wrote: the results document (as in results.json) and the paths."""

    results: dict[str, Any]
    results_path: Path
    table_path: Path
    chart_path: Path


def write_results(
    results: dict[str, Any], labels: Mapping[str, str], out_dir: Path, console: Console
) -> EvaluationResult:
    """Write `results` to `out_dir`/results.json and its comparison to comparison.md and
    comparison.png: a column per model of `results["models"]`, in `results["model_order"]`, headed
    `labels[key]`; the first is the baseline when `results["baseline"]` names it. Prints the table
    and the results path to `console`. Returns the document and the three paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [(labels[key], results["models"][key]) for key in results["model_order"]]
    comparison = compare(columns, baseline=results.get("baseline") is not None)
    results_path = out_dir / "results.json"
    results_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    table_path = out_dir / "comparison.md"
    table_path.write_text(markdown_table(comparison))
    chart_path = write_chart(comparison, out_dir / "comparison.png")
    console.print(rich_table(comparison))
    console.print(f"results: {escape(str(results_path))}")
    return EvaluationResult(results, results_path, table_path, chart_path)
