"""What the three multiple-choice benchmarks share: the question record, the model interface, the
benchmark description, file reading with located errors, the k-shot log-likelihood prompt and the
Wilson interval."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dapc.errors import DapcError

LETTERS = ("A", "B", "C", "D")

# z for a two-sided 95% interval: the 0.975 quantile of the standard normal.
_Z95 = 1.959963984540054


@dataclass(frozen=True)
class Question:
    """One question as read from a benchmark file.

    `row` says where it came from (`file:line` or `file:[index]`), `options` are the texts of
    A..D in order, `gold` the correct letters upper-cased and sorted ("B", or "AC" for SecEval),
    `prompt` the benchmark's own generation prompt where the file ships one (CTI-MCQ), `id` what
    a supplied response names the question by (see `Benchmark.id_rule`; "" when the file gives none).
    """

    row: str
    text: str
    options: tuple[str, str, str, str]
    gold: str
    topics: tuple[str, ...] = ()
    prompt: str = ""
    id: str = ""


@dataclass(frozen=True)
class Prompt:
    """A generation prompt in both forms: `plain` text for a model without a chat template,
    `chat` messages ({"role", "content"}) for a model with one."""

    plain: str
    chat: tuple[dict[str, str], ...]


class LanguageModel(Protocol):
    """What the scorers need from a model; a scripted stand-in can implement it in a few lines."""

    chat: bool
    """True when `generate` renders `Prompt.chat` through a chat template, False for `Prompt.plain`."""

    def loglik(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Sum of the log-probabilities (nats) of each continuation's tokens after its context."""
        ...

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
        """Greedy completion of each prompt: the generated text only, without the prompt."""
        ...


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: how to read its file, what the log-likelihood mode scores, how the official
    evaluator prompts and reads a generated answer."""

    name: str
    published_at: str
    description: str
    """Header of the log-likelihood prompt; ends with a blank line."""
    choices: tuple[str, ...]
    """Answers scored in log-likelihood mode, each as letters ("A", or "AC" for SecEval)."""
    load: Callable[[Path], list[Question]]
    generation_prompt: Callable[[Question], Prompt]
    extract: Callable[[str], str | None]
    """The official rule that reads the answer from a response: letters, or a mark the official
    scorer accepts as an answer (CTI-MCQ's "X"); None when the official scorer finds none."""
    max_new_tokens: int
    generation_shots: tuple[int, int]
    """Worked examples inside the official generation prompt: (plain, chat)."""
    id_rule: str
    """What the "id" of a supplied response is for this benchmark, in words (for --help and errors)."""
    official_over_parsed: bool = False
    """True when the official scorer divides the correct answers by the responses its rule could
    read rather than by all questions (CTI-MCQ)."""


def question_text(question: Question) -> str:
    """The zero-shot log-likelihood prompt of one question, in the MMLU layout that lm-eval's
    `mmlu` task uses; it ends with "Answer:" and the scored continuation is " " + letters."""
    lines = [question.text.strip()]
    lines += [f"{letter}. {option}" for letter, option in zip(LETTERS, question.options, strict=True)]
    lines.append("Answer:")
    return "\n".join(lines)


def shots_for(questions: Sequence[Question], index: int, k_shot: int) -> list[Question]:
    """The k worked examples for question `index`: the first k questions of the file other than
    itself (lm-eval's `first_n` sampler drawing from the test split)."""
    return [q for i, q in enumerate(questions) if i != index][:k_shot]


def loglik_context(benchmark: Benchmark, questions: Sequence[Question], index: int, k_shot: int) -> str:
    """The k-shot log-likelihood context for question `index`: the description, k answered
    questions separated by blank lines, then the question, ending with "Answer:". Built as
    lm-eval builds a `multiple_choice` context (target delimiter " ", few-shot delimiter "\\n\\n")."""
    shots = "".join(f"{question_text(q)} {q.gold}\n\n" for q in shots_for(questions, index, k_shot))
    return benchmark.description + shots + question_text(questions[index])


def wilson_interval(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval for a proportion `correct / n`, as (low, high) fractions."""
    p = correct / n
    z2 = _Z95 * _Z95
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = _Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def read_text(path: Path, benchmark: Benchmark) -> str:
    """The file's text (UTF-8, newlines kept as written); a DapcError if it is missing, unreadable
    or empty."""
    if not path.is_file():
        raise DapcError(
            f"{benchmark.name} benchmark file not found; it is published at {benchmark.published_at}",
            str(path),
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DapcError(f"not UTF-8 text (byte {e.start}): not a {benchmark.name} file", str(path)) from e
    if not text.strip():
        raise DapcError(f"file is empty; expected a {benchmark.name} file", str(path))
    return text


def read_json(path: Path, benchmark: Benchmark) -> Any:
    """The parsed JSON document; a DapcError located at `file:line:col` if it does not parse."""
    text = read_text(path, benchmark)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DapcError(f"not valid JSON: {e.msg}", f"{path}:{e.lineno}:{e.colno}") from e


def require(condition: bool, message: str, location: str) -> None:
    """Raise DapcError(message, location) unless `condition` holds (user input is never `assert`ed)."""
    if not condition:
        raise DapcError(message, location)


def require_text(record: dict, key: str, location: str) -> str:
    """`record[key]` when it is a non-empty string; otherwise a DapcError naming the key."""
    value = record.get(key)
    require(isinstance(value, str) and bool(value.strip()), f'"{key}" must be a non-empty string', location)
    return value
