"""Responses produced elsewhere: one JSONL file per model and benchmark, a `{"id": ..., "response":
"text"}` object per line, matched to the benchmark's questions by id (`Benchmark.id_rule`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dapc.errors import DapcError
from runtime.evaluate.common import Benchmark, Question, require

# Longest id or value quoted back in an error line, characters.
_SHOWN_CHARS = 60
_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}


@dataclass(frozen=True)
class SuppliedResponses:
    """One file's responses in question order, None where a question has no line; the file and
    the sha256 of its bytes, so results say exactly what was scored."""

    path: Path
    sha256: str
    responses: tuple[str | None, ...]

    @property
    def missing(self) -> int:
        """Questions without a response."""
        return sum(response is None for response in self.responses)


def read_responses(path: Path, benchmark: Benchmark, questions: Sequence[Question]) -> SuppliedResponses:
    """The responses in `path` to `questions`, placed by id; blank lines are skipped. Returns them
    with the file's hash. A DapcError located at `file:line` for a line that is not a JSON object
    with an "id" naming a question once and a string "response"; at `file` when it is missing,
    not UTF-8 or holds no response; at the question's row when the benchmark file gives it no id."""
    index = _question_index(benchmark, questions)
    if not path.is_file():
        raise DapcError(f"{benchmark.name} responses file not found", str(path))
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not part of the first line
    except UnicodeDecodeError as e:
        raise DapcError(f"not UTF-8 text (byte {e.start}): expected JSON lines", str(path)) from e
    responses: list[str | None] = [None] * len(questions)
    first_line: dict[int, int] = {}
    # split("\n"), not splitlines(): a JSON string may hold U+2028 and other separators unescaped.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        location = f"{path}:{line_number}"
        record = _record(line, location, benchmark)
        position = index.get(str(record["id"]))  # an integer id matches its decimal digits
        if position is None:
            raise DapcError(
                f"id {_shown(record['id'])} is not one of the {len(questions):,} {benchmark.name} questions; "
                f"a {benchmark.name} id is {benchmark.id_rule}",
                location,
            )
        if position in first_line:
            raise DapcError(f"id {_shown(record['id'])} is answered twice, first on line {first_line[position]}",
                            location)
        first_line[position] = line_number
        responses[position] = record["response"]
    require(bool(first_line), 'no responses: expected one {"id": ..., "response": "text"} per line', str(path))
    return SuppliedResponses(path, hashlib.sha256(data).hexdigest(), tuple(responses))


def _question_index(benchmark: Benchmark, questions: Sequence[Question]) -> dict[str, int]:
    index: dict[str, int] = {}
    for position, question in enumerate(questions):
        require(
            bool(question.id),
            f"question has no id; responses name {benchmark.name} questions by {benchmark.id_rule}",
            question.row,
        )
        if question.id in index:
            first = questions[index[question.id]].row
            raise DapcError(f"id {_shown(question.id)} is also the id of {first}; responses could not tell them apart",
                            question.row)
        index[question.id] = position
    return index


def _record(line: str, location: str, benchmark: Benchmark) -> dict:
    """The line's object once it has a string or integer "id" and a string "response"."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DapcError(f"not valid JSON: {e.msg} (column {e.colno})", location) from e
    require(
        isinstance(record, dict),
        f'expected an object {{"id": ..., "response": "text"}}, found {_kind(record)}',
        location,
    )
    require("id" in record, f'no "id": a {benchmark.name} id is {benchmark.id_rule}', location)
    value = record["id"]
    require(
        isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)),
        f'"id" must be a string or an integer, found {_kind(value)}',
        location,
    )
    require("response" in record, 'no "response": expected the model\'s answer text', location)
    response = record["response"]
    require(isinstance(response, str), f'"response" must be a string, found {_kind(response)}', location)
    return record


def _kind(value: object) -> str:
    return _JSON_TYPES.get(type(value), "a number")


def _shown(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."
