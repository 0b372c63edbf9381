"""Score a model on a benchmark's questions, by log-likelihood or by generation, in batches, or score
responses produced elsewhere; generated and supplied responses are read by the same official rule."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from runtime.evaluate.common import Benchmark, LanguageModel, Question, loglik_context, wilson_interval

# Questions handed to the model per call: large enough for the model to batch, small enough for
# the progress bar to move.
QUESTIONS_PER_CALL = 64

# How a model is scored here: the best-scoring option, or the official prompt and answer rule.
MODES = ("loglik", "generate")

Progress = Callable[[int], None]


@dataclass(frozen=True)
class TopicScore:
    """Questions, correct answers and accuracy (fraction 0-1) under one topic."""

    n: int
    correct: int
    accuracy: float


@dataclass(frozen=True)
class BenchmarkScore:
    """One model on one benchmark. `accuracy` (correct over all `n` questions) and `ci95` (Wilson,
    95%) are fractions 0-1; `mode` is "loglik", "generate" or "responses" (supplied, not
    generated here); `k_shot` and `prompt_sha256` (a hash of every prompt and scored continuation,
    so two runs with equal hashes asked exactly the same) are None for supplied responses, whose
    prompts dapc never saw. The rest is None in log-likelihood mode: `unparsed` counts responses
    the official rule could not read, questions without a response included; `missing` counts
    those questions (supplied responses only); `official_accuracy` is correct over the responses
    the rule could read, as the official scorer divides (CTI-MCQ only; None when none could be
    read). `per_topic` is filled for benchmarks whose questions carry topics."""

    benchmark: str
    n: int
    correct: int
    accuracy: float
    ci95: tuple[float, float]
    mode: str
    k_shot: int | None
    prompt_sha256: str | None
    unparsed: int | None = None
    missing: int | None = None
    official_accuracy: float | None = None
    per_topic: dict[str, TopicScore] = field(default_factory=dict)


def score_loglik(
    model: LanguageModel,
    benchmark: Benchmark,
    questions: Sequence[Question],
    *,
    k_shot: int,
    limit: int | None = None,
    progress: Progress | None = None,
) -> BenchmarkScore:
    """Pick, for each of the first `limit` questions, the choice whose " " + letters has the
    highest log-likelihood after the k-shot context (ties go to the earlier choice). Worked
    examples come from the whole file, never the question itself."""
    evaluated = questions[:limit] if limit else questions
    hasher = hashlib.sha256()
    picks: list[str] = []
    continuations = [" " + choice for choice in benchmark.choices]
    for start in range(0, len(evaluated), QUESTIONS_PER_CALL):
        indices = range(start, min(start + QUESTIONS_PER_CALL, len(evaluated)))
        contexts = [loglik_context(benchmark, questions, i, k_shot) for i in indices]
        for context in contexts:
            hasher.update(json.dumps([context, continuations]).encode())
        scores = model.loglik(
            [c for c in contexts for _ in continuations], [k for _ in contexts for k in continuations]
        )
        for offset in range(len(contexts)):
            row = scores[offset * len(continuations) : (offset + 1) * len(continuations)]
            picks.append(benchmark.choices[row.index(max(row))])
        if progress:
            progress(len(contexts))
    return _score(benchmark, evaluated, picks, "loglik", k_shot, hasher.hexdigest(), unparsed=None)


def score_generate(
    model: LanguageModel,
    benchmark: Benchmark,
    questions: Sequence[Question],
    *,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    progress: Progress | None = None,
) -> BenchmarkScore:
    """Ask each of the first `limit` questions with the official prompt (chat form when the
    model has a chat template), decode greedily up to `max_new_tokens` (default: the
    benchmark's), and read the answer with the official rule."""
    evaluated = questions[:limit] if limit else questions
    hasher = hashlib.sha256(json.dumps({"chat": model.chat}).encode())
    responses: list[str] = []
    for start in range(0, len(evaluated), QUESTIONS_PER_CALL):
        prompts = [benchmark.generation_prompt(q) for q in evaluated[start : start + QUESTIONS_PER_CALL]]
        for prompt in prompts:
            hasher.update(json.dumps([prompt.plain, prompt.chat]).encode())
        responses += model.generate(prompts, max_new_tokens or benchmark.max_new_tokens)
        if progress:
            progress(len(prompts))
    k_shot = benchmark.generation_shots[1 if model.chat else 0]
    return _score_responses(benchmark, evaluated, responses, "generate", k_shot, hasher.hexdigest())


def score_responses(
    benchmark: Benchmark, questions: Sequence[Question], responses: Sequence[str | None]
) -> BenchmarkScore:
    """Read `responses[i]`, the answer some model gave to `questions[i]`, with the official rule
    and score them as `score_generate` scores its own; a None response (the question went
    unanswered) counts as unparsed and in `missing`."""
    missing = sum(response is None for response in responses)
    return _score_responses(benchmark, questions, responses, "responses", None, None, missing)


def _score_responses(
    benchmark: Benchmark,
    questions: Sequence[Question],
    responses: Sequence[str | None],
    mode: str,
    k_shot: int | None,
    prompt_sha256: str | None,
    missing: int | None = None,
) -> BenchmarkScore:
    picks = [None if response is None else benchmark.extract(response) for response in responses]
    unparsed = sum(pick is None for pick in picks)
    score = _score(benchmark, questions, picks, mode, k_shot, prompt_sha256, unparsed)
    parsed = len(questions) - unparsed
    official = score.correct / parsed if benchmark.official_over_parsed and parsed else None
    return replace(score, missing=missing, official_accuracy=official)


def _score(
    benchmark: Benchmark,
    questions: Sequence[Question],
    picks: Sequence[str | None],
    mode: str,
    k_shot: int | None,
    prompt_sha256: str | None,
    unparsed: int | None,
) -> BenchmarkScore:
    hits = [pick == q.gold for q, pick in zip(questions, picks, strict=True)]
    correct = sum(hits)
    topics: dict[str, list[bool]] = {}
    for question, hit in zip(questions, hits, strict=True):
        for topic in question.topics:
            topics.setdefault(topic, []).append(hit)
    return BenchmarkScore(
        benchmark=benchmark.name,
        n=len(questions),
        correct=correct,
        accuracy=correct / len(questions),
        ci95=wilson_interval(correct, len(questions)),
        mode=mode,
        k_shot=k_shot,
        prompt_sha256=prompt_sha256,
        unparsed=unparsed,
        per_topic={
            topic: TopicScore(len(results), sum(results), sum(results) / len(results))
            for topic, results in sorted(topics.items())
        },
    )
