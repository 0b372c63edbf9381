"""`run_evaluation`: score a model (and the model it was adapted from) on the benchmarks and the
perplexity texts, and write results.json, comparison.md and comparison.png."""

from __future__ import annotations

import gc
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from dapc.errors import DapcError
from runtime.evaluate import cti_mcq, cybermetric, seceval
from runtime.evaluate.chart import write_chart
from runtime.evaluate.common import Benchmark, Question
from runtime.evaluate.hf_model import DEFAULT_BATCH_TOKENS, HFModel, model_dir
from runtime.evaluate.perplexity import TextSource, perplexity
from runtime.evaluate.report import comparison_rows, markdown_table, rich_table
from runtime.evaluate.scoring import score_generate, score_loglik

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (cti_mcq.BENCHMARK, cybermetric.BENCHMARK, seceval.BENCHMARK)}
MODES = ("loglik", "generate")
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class EvaluationResult:
    """What `run_evaluation` wrote: the results document (as in results.json) and the paths."""

    results: dict[str, Any]
    results_path: Path
    table_path: Path
    chart_path: Path


def run_evaluation(
    model: str | Path,
    benchmarks: Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    compare_to: str | Path | None = None,
    general_text: TextSource | None = None,
    domain_text: TextSource | None = None,
    mode: str = "loglik",
    k_shot: int = 5,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    ppl_seq_len: int = 1024,
    ppl_max_tokens: int = 1 << 20,
    device: str | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    chat: bool | None = None,
    console: Console | None = None,
) -> EvaluationResult:
    """Evaluate the Hugging Face model directory `model`, and `compare_to` (the model it was
    adapted from) when given, and write to `out_dir`:
    results.json (per model: path, revision, per benchmark n / correct / accuracy and its 95%
    Wilson interval as fractions 0-1 / mode / k-shot / prompt hash, and perplexities), comparison.md
    (the table, base vs adapted with changes) and comparison.png; the table is also printed to
    `console` (default: stderr).

    benchmarks: benchmark name ("cti-mcq", "cybermetric", "seceval") -> its file.
    general_text, domain_text: perplexity sources (text files or directories, or token-id arrays,
        or a function returning them); each is skipped when None. An iterator is used up by the
        first model: with `compare_to`, pass a list or a function that returns a fresh iterator.
    mode: "loglik" (default; the option with the highest log-likelihood after a `k_shot`-shot
        prompt) or "generate" (greedy answer to the official prompt, read by the official rule;
        `k_shot` is then the official prompt's own, and `max_new_tokens` overrides each
        benchmark's default).
    limit: score only the first `limit` questions of each benchmark.
    ppl_seq_len, ppl_max_tokens: window length and total tokens (per text set) for perplexity.
    device, batch_tokens, chat: as for `HFModel` (device default CUDA if present; padded tokens
        per forward pass; chat template for generation, default when the tokenizer has one).

    Raises DapcError for a bad argument, a missing or malformed benchmark file, a missing model.
    Returns the results document and the three paths.
    """
    console = console or Console(stderr=True)
    if mode not in MODES:
        raise DapcError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if k_shot < 0 or (limit is not None and limit < 1):
        raise DapcError(f"k_shot must be >= 0 and limit >= 1 (got k_shot={k_shot}, limit={limit})")
    for path in (model, compare_to):
        if path is not None:
            model_dir(path)  # both models exist before either is evaluated
    loaded = _load_benchmarks(benchmarks)
    texts = {
        name: source for name, source in (("general", general_text), ("domain", domain_text)) if source is not None
    }
    if not loaded and not texts:
        raise DapcError("nothing to evaluate: give at least one benchmark file or perplexity text")
    settings = {
        "mode": mode,
        "k_shot": k_shot if mode == "loglik" else None,
        "limit": limit,
        "max_new_tokens": max_new_tokens,
        "ppl_seq_len": ppl_seq_len,
        "ppl_max_tokens": ppl_max_tokens,
        "benchmark_files": {name: str(Path(path).resolve()) for name, path in benchmarks.items()},
    }

    def evaluate(path: str | Path) -> dict[str, Any]:
        hf = HFModel(path, device=device, batch_tokens=batch_tokens, chat=chat)
        report = _evaluate_model(hf, loaded, texts, settings, console)
        del hf
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return report

    models = {"model": evaluate(model)}
    if compare_to is not None:
        models["compare_to"] = evaluate(compare_to)
    results = {"schema_version": SCHEMA_VERSION, "settings": settings, "models": models}
    return _write(results, Path(out_dir), console)


def _load_benchmarks(files: Mapping[str, str | Path]) -> dict[str, tuple[Benchmark, list[Question]]]:
    """Read every benchmark file before any model loads, so a bad file fails fast."""
    loaded = {}
    for name, path in files.items():
        if name not in BENCHMARKS:
            raise DapcError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
        loaded[name] = (BENCHMARKS[name], BENCHMARKS[name].load(Path(path)))
    return loaded


def _evaluate_model(
    hf: HFModel,
    loaded: Mapping[str, tuple[Benchmark, Sequence[Question]]],
    texts: Mapping[str, TextSource],
    settings: dict[str, Any],
    console: Console,
) -> dict[str, Any]:
    identity = {"model_path": str(hf.path), "model_revision": hf.revision}
    scores = {}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    ) as progress:
        for name, (benchmark, questions) in loaded.items():
            total = min(len(questions), settings["limit"] or len(questions))
            task = progress.add_task(f"{escape(hf.path.name)} {name}", total=total)
            advance = partial(progress.advance, task)
            if settings["mode"] == "loglik":
                score = score_loglik(
                    hf, benchmark, questions, k_shot=settings["k_shot"], limit=settings["limit"], progress=advance
                )
            else:
                score = score_generate(
                    hf,
                    benchmark,
                    questions,
                    max_new_tokens=settings["max_new_tokens"],
                    limit=settings["limit"],
                    progress=advance,
                )
            scores[name] = {**asdict(score), **identity}
    perplexities = {
        name: asdict(perplexity(hf, source, seq_len=settings["ppl_seq_len"], max_tokens=settings["ppl_max_tokens"]))
        for name, source in texts.items()
    }
    return {
        "path": identity["model_path"],
        "revision": identity["model_revision"],
        "benchmarks": scores,
        "perplexity": perplexities,
    }


def _write(results: dict[str, Any], out_dir: Path, console: Console) -> EvaluationResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    model_label = Path(results["models"]["model"]["path"]).name
    base = results["models"].get("compare_to")
    base_label = Path(base["path"]).name if base else None
    rows = comparison_rows(results)
    results_path = out_dir / "results.json"
    results_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    table_path = out_dir / "comparison.md"
    table_path.write_text(markdown_table(rows, model_label, base_label))
    chart_path = write_chart(rows, out_dir / "comparison.png", model_label, base_label)
    console.print(rich_table(rows, escape(model_label), escape(base_label) if base_label else None))
    console.print(f"results: {escape(str(results_path))}")
    return EvaluationResult(results, results_path, table_path, chart_path)
