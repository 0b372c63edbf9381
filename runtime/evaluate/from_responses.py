"""`evaluate_responses`: score answers produced elsewhere (one JSONL file per model and benchmark) with
each benchmark's official rule, and write the same results.json, comparison.md and comparison.png as a
model evaluation. Needs no model, and imports neither torch nor transformers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from dapc.errors import DapcError
from runtime.evaluate.benchmarks import BENCHMARKS, load_benchmarks
from runtime.evaluate.output import SCHEMA_VERSION, EvaluationResult, write_results
from runtime.evaluate.responses import read_responses
from runtime.evaluate.scoring import score_responses


def evaluate_responses(
    responses: Mapping[str, Mapping[str, str | Path]],
    benchmarks: Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    baseline: str | None = None,
    console: Console | None = None,
) -> EvaluationResult:
    """Score every model's responses and write to `out_dir`: results.json (per model, per
    benchmark: n / correct / accuracy over all questions with its 95% Wilson interval, as
    fractions 0-1, unparsed and missing counts, CTI-MCQ's official accuracy, the responses file
    and its sha256), comparison.md and comparison.png, a column per model; the table is also
    printed to `console` (default: stderr), with a warning per file that leaves questions
    unanswered (they count as unparsed).

    responses: model name -> benchmark name -> its JSONL file; models are compared in this order.
    benchmarks: benchmark name ("cti-mcq", "cybermetric", "seceval") -> its file; every benchmark
        answered must be given, and every one given must be answered by some model.
    baseline: the model the others were adapted from: its column comes first and the table adds
        each other model's change from it.

    Raises DapcError, before anything is written, for a bad argument, a bad benchmark file or a
    bad responses line (located at `file:line`). Returns the results document and the three paths.
    """
    console = console or Console(stderr=True)
    _check(responses, benchmarks, baseline)
    loaded = load_benchmarks(benchmarks)
    order = [baseline, *(m for m in responses if m != baseline)] if baseline else list(responses)
    models: dict[str, Any] = {}
    for model in order:
        scores = {}
        for name, path in responses[model].items():
            benchmark, questions = loaded[name]
            supplied = read_responses(Path(path), benchmark, questions)
            if supplied.missing:
                console.print(
                    f"warning: {escape(model)} {name}: {supplied.missing:,} of {len(questions):,} questions have no "
                    f"response in {escape(str(path))}; scored as unparsed",
                    soft_wrap=True,
                )
            score = score_responses(benchmark, questions, supplied.responses)
            scores[name] = {
                **asdict(score),
                "responses_path": str(supplied.path.resolve()),
                "responses_sha256": supplied.sha256,
            }
        models[model] = {"name": model, "benchmarks": scores, "perplexity": {}}
    results = {
        "schema_version": SCHEMA_VERSION,
        "settings": {
            "mode": "responses",
            "benchmark_files": {name: str(Path(path).resolve()) for name, path in benchmarks.items()},
        },
        "models": models,
        "model_order": order,
        "baseline": baseline,
    }
    return write_results(results, {model: model for model in order}, Path(out_dir), console)


def _check(
    responses: Mapping[str, Mapping[str, str | Path]], benchmarks: Mapping[str, str | Path], baseline: str | None
) -> None:
    if not responses:
        raise DapcError("no responses to score: give at least one MODEL:BENCHMARK=FILE")
    answered = {name for files in responses.values() for name in files}
    for model, files in responses.items():
        for name in files:
            if name not in BENCHMARKS:
                raise DapcError(f"responses of {model} to {name!r}: unknown benchmark; known: {', '.join(BENCHMARKS)}")
            if name not in benchmarks:
                raise DapcError(f"responses of {model} to {name} need the {name} file: add --benchmark {name}=PATH")
    for name in benchmarks:
        if name not in answered:
            raise DapcError(f"--benchmark {name} is given but no model's responses to it are")
    if baseline is not None and baseline not in responses:
        raise DapcError(f"baseline {baseline!r} is not one of the models with responses: {', '.join(responses)}")
