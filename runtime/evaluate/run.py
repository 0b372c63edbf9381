"""`evaluate_models`: score any number of model directories (base -> CPT -> SFT -> DPO), one loaded at a
time, on the same benchmarks and perplexity texts with the same settings, and write results.json,
comparison.md and comparison.png with a column per model. `run_evaluation` is its two-model form (a
model and the base it was adapted from), as `--plan` and `--model DIR --compare-to DIR` run it."""

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
from runtime.evaluate.hf_model import DEFAULT_BATCH_TOKENS, HFModel
from runtime.evaluate.model_dirs import model_dir
from runtime.evaluate.output import SCHEMA_VERSION, EvaluationResult, write_results
from runtime.evaluate.perplexity import TextSource, perplexity
from runtime.evaluate.scoring import MODES, score_generate, score_loglik

__all__ = ["BENCHMARKS", "MODES", "EvaluationResult", "evaluate_models", "run_evaluation"]


def run_evaluation(
    model: str | Path,
    benchmarks: Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    compare_to: str | Path | None = None,
    **options: Any,
) -> EvaluationResult:
    """Evaluate the Hugging Face model directory `model`, and `compare_to` (the model it was adapted
    from) when given: `evaluate_models` with the base keyed "compare_to" and listed first, headed
    "base: <its folder>", and the model keyed "model", headed "model: <its folder>". `options` are
    `evaluate_models`' keywords (all but `baseline` and `labels`)."""
    models = {"model": model} if compare_to is None else {"compare_to": compare_to, "model": model}
    prefixes = {"compare_to": "base: ", "model": "model: "}
    labels = {key: prefixes[key] + model_dir(path).name for key, path in models.items()}
    return evaluate_models(models, benchmarks, out_dir, baseline=compare_to is not None, labels=labels, **options)


def evaluate_models(
    models: Mapping[str, str | Path],
    benchmarks: Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    baseline: bool = True,
    labels: Mapping[str, str] | None = None,
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
    """Evaluate each Hugging Face model directory of `models` (name -> directory, in the order to
    compare them), loading one at a time and freeing it before the next, and write to `out_dir`:
    results.json (per model, keyed by its name: path, revision, per benchmark n / correct / accuracy
    and its 95% Wilson interval as fractions 0-1 / mode / k-shot / prompt hash, and perplexities;
    "model_order" and "baseline" say how the comparison lists them), comparison.md (the table: a
    column per model and, with a baseline, each other model's change from the first) and
    comparison.png; the table is also printed to `console` (default: stderr), after a line per model
    as it loads.

    benchmarks: benchmark name ("cti-mcq", "cybermetric", "seceval") -> its file.
    baseline: the first model is the one the others were adapted from (ignored for a single model).
    labels: model name -> its column heading (default: the name).
    general_text, domain_text: perplexity sources (text files or directories, or token-id arrays,
        or a function returning them); each is skipped when None. An iterator is used up by the
        first model: for several models, pass a list or a function that returns a fresh iterator.
    mode: "loglik" (default; the option with the highest log-likelihood after a `k_shot`-shot
        prompt) or "generate" (greedy answer to the official prompt, read by the official rule;
        `k_shot` is then the official prompt's own, and `max_new_tokens` overrides each
        benchmark's default).
    limit: score only the first `limit` questions of each benchmark.
    ppl_seq_len, ppl_max_tokens: window length and total tokens (per text set) for perplexity.
    device, batch_tokens, chat: as for `HFModel` (device default CUDA if present; padded tokens
        per forward pass; chat template for generation, default when the tokenizer has one).

    Raises DapcError, before any model loads, for a bad argument, a missing or malformed benchmark
    file, or a directory that is not a model. Returns the results document and the three paths.
    """
    console = console or Console(stderr=True)
    if not models:
        raise DapcError("no model to evaluate: give at least one model directory")
    if mode not in MODES:
        raise DapcError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if k_shot < 0 or (limit is not None and limit < 1):
        raise DapcError(f"k_shot must be >= 0 and limit >= 1 (got k_shot={k_shot}, limit={limit})")
    for path in models.values():
        model_dir(path)  # every model exists before any is evaluated
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
    labels = {name: (labels or {}).get(name, name) for name in models}
    scored: dict[str, Any] = {}
    for number, (name, path) in enumerate(models.items(), start=1):
        heading = f"model {number}/{len(models)} ({escape(labels[name])})"
        console.print(f"{heading}: loading {escape(str(path))}", soft_wrap=True)
        hf = HFModel(path, device=device, batch_tokens=batch_tokens, chat=chat)
        scored[name] = _evaluate_model(hf, labels[name], loaded, texts, settings, console)
        del hf  # freed before the next model loads: never two in memory
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    order = list(models)
    results = {
        "schema_version": SCHEMA_VERSION,
        "settings": settings,
        "models": scored,
        "model_order": order,
        "baseline": order[0] if baseline and len(order) > 1 else None,
    }
    return write_results(results, labels, Path(out_dir), console)


def _evaluate_model(
    hf: HFModel,
    label: str,
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
            task = progress.add_task(f"{escape(label)} {name}", total=total)
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
