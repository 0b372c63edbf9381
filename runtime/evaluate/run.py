"""`run_evaluation`: score a model (and the model it was adapted from) on the benchmarks and the
perplexity texts, and write results.json, comparison.md and comparison.png."""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from dataclasses import asdict
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
from runtime.evaluate.benchmarks import BENCHMARKS, load_benchmarks
from runtime.evaluate.common import Benchmark, Question
from runtime.evaluate.hf_model import DEFAULT_BATCH_TOKENS, HFModel, model_dir
from runtime.evaluate.output import SCHEMA_VERSION, EvaluationResult, write_results
from runtime.evaluate.perplexity import TextSource, perplexity
from runtime.evaluate.scoring import MODES, score_generate, score_loglik

__all__ = ["BENCHMARKS", "MODES", "EvaluationResult", "run_evaluation"]


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
    Wilson interval as fractions 0-1 / mode / k-shot / prompt hash, and perplexities; "model_order"
    and "baseline" say how the comparison lists them), comparison.md (the table, base vs adapted
    with changes) and comparison.png; the table is also printed to `console` (default: stderr).

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
    loaded = load_benchmarks(benchmarks)
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
    results = {
        "schema_version": SCHEMA_VERSION,
        "settings": settings,
        "models": models,
        "model_order": ["compare_to", "model"] if compare_to is not None else ["model"],
        "baseline": "compare_to" if compare_to is not None else None,
    }
    labels = {
        "model": f"model: {Path(models['model']['path']).name}",
        "compare_to": f"base: {Path(models['compare_to']['path']).name}" if compare_to is not None else "",
    }
    return write_results(results, labels, Path(out_dir), console)


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
