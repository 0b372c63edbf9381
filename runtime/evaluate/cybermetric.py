"""CyberMetric (Tihanyi et al., 2024, arXiv 2402.07688): four-option cybersecurity questions in
80/500/2000/10000-question JSON files, `{"questions": [{"question", "answers": {"A".."D"},
"solution"}]}`. The repository states no licence, so dapc ships none of its files.

Official scoring, from github.com/cybermetric/CyberMetric `CyberMetric_evaluator.py` (commit
4f183056): the model is asked, under the system prompt "You are a security expert who answers
questions.", for "Question: ...\\nOptions: A) .., B) ..\\n\\nChoose the correct answer (A, B, C, or
D) only. Always return in this format: 'ANSWER: X' "; the letter is the first match of
`ANSWER:?\\s*([A-D])` (case-insensitive), upper-cased, compared with `solution`. The evaluator
re-asks up to 5 times when nothing matches; under greedy decoding a re-ask returns the same text,
so we ask once and count no match as wrong.

A supplied response's id is the question's 0-based position in the file's "questions" list.
"""

from __future__ import annotations

import re
from pathlib import Path

from runtime.evaluate.common import LETTERS, Benchmark, Prompt, Question, read_json, require, require_text

SYSTEM_PROMPT = "You are a security expert who answers questions."

_ANSWER = re.compile(r"ANSWER:?\s*([A-D])", re.IGNORECASE)


def extract_letter(response: str) -> str | None:
    """The letter after the first "ANSWER:" in a response (`extract_answer`), or None."""
    match = _ANSWER.search(response)
    return match.group(1).upper() if match else None


def load(path: Path) -> list[Question]:
    """The questions of a CyberMetric JSON file, in file order; a DapcError located at
    `file:questions[i]` for a record the official evaluator could not use."""
    document = read_json(path, BENCHMARK)
    records = document.get("questions") if isinstance(document, dict) else None
    require(isinstance(records, list), 'expected a JSON object with a "questions" list', str(path))
    require(bool(records), '"questions" is empty', str(path))
    questions = []
    for index, record in enumerate(records):
        location = f"{path}:questions[{index}]"
        require(isinstance(record, dict), "expected an object", location)
        text = require_text(record, "question", location)
        answers = record.get("answers")
        require(
            isinstance(answers, dict) and sorted(answers) == list(LETTERS),
            '"answers" must map exactly A, B, C, D to option texts',
            location,
        )
        solution = record.get("solution")
        require(solution in LETTERS, f'"solution" is {solution!r}, expected one of A, B, C, D', location)
        options = tuple(str(answers[letter]) for letter in LETTERS)
        questions.append(Question(location, text, options, solution, id=str(index)))
    return questions


def generation_prompt(question: Question) -> Prompt:
    """`ask_llm`'s prompt. The evaluator only speaks chat; for a model without a chat template
    the system prompt and the question are joined by a blank line."""
    options = ", ".join(f"{letter}) {option}" for letter, option in zip(LETTERS, question.options, strict=True))
    user = (
        f"Question: {question.text}\nOptions: {options}\n\n"
        "Choose the correct answer (A, B, C, or D) only. Always return in this format: 'ANSWER: X' "
    )
    return Prompt(
        plain=f"{SYSTEM_PROMPT}\n\n{user}",
        chat=({"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}),
    )


BENCHMARK = Benchmark(
    name="cybermetric",
    published_at="https://github.com/cybermetric/CyberMetric (CyberMetric-80/500/2000/10000-v1.json)",
    description="The following are multiple choice questions (with answers) about cybersecurity.\n\n",
    choices=LETTERS,
    load=load,
    generation_prompt=generation_prompt,
    extract=extract_letter,
    # The evaluator leaves the length to the API's default; the answer format needs a few tokens.
    max_new_tokens=64,
    generation_shots=(0, 0),
    id_rule='the question\'s 0-based position in the file\'s "questions" list',
)
