"""CTI-MCQ from CTIBench (Alam et al., NeurIPS 2024 Datasets & Benchmarks): 2,500 four-option
questions on cyber threat intelligence, a tab-separated file with a ready-made generation prompt.

Official scoring, from github.com/xashru/cti-bench at commit cb79d156:
- `evaluation/model-prediction.ipynb`, `format_mcq`: the answer is read from the response's last
  line (split on "\\n", right-stripped): a line starting "A)".."D)" gives that letter, a line
  ending in A..D gives its last character, a line ending in "**" gives the character three from
  the end; when the last line is empty the line before it (and only that one) is read the same
  way; otherwise the whole response, lines joined by spaces, is kept. `extract_letter` is that
  function, line for line, followed by the notebook's upper-casing and its validity test.
- `evaluation/evaluation.ipynb`, `compute_mcq_accuracy`: `pred.upper() == gt.upper()`, which is
  how the one lower-case GT ("b", row 110) counts, over the answers that are valid: A-D, or X
  (the notebook's mark for a refusal). We report that (`official_accuracy`) and accuracy over all
  questions, with the count of invalid answers as unparsed, so a model that answers nothing
  readable scores 0 next to an undefined official accuracy, not 0/0.
- The files were read with `pandas.read_csv(sep="\\t")`, which turns an empty cell into NaN; the
  shipped `Prompt` column therefore shows an empty option as "nan" (5 rows), and so do we.
- A supplied response's id is the question's 0-based data row in the file (the header is not a
  row): 0 is the question on line 2.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from runtime.evaluate.common import LETTERS, Benchmark, Prompt, Question, read_text, require

COLUMNS = ["URL", "Question", "Option A", "Option B", "Option C", "Option D", "Prompt", "GT"]

# The system prompt of model-prediction.ipynb; for models without a chat template the notebook
# sends `sys_prompt + ' ' + question` (its Llama, Gemma and Gemini path).
SYSTEM_PROMPT = "You are a cybersecurity expert specializing in cyberthreat intelligence."

# pandas' rendering of an empty cell, as it appears in the shipped Prompt column.
EMPTY_OPTION = "nan"

# What compute_mcq_accuracy counts as an answer: a letter, or X for a refusal.
VALID_ANSWERS = (*LETTERS, "X")


def normalize_gold(gt: str) -> str:
    """The GT letter as the official scorer compares it: upper-cased."""
    return gt.strip().upper()


def extract_letter(response: str) -> str | None:
    """The answer `format_mcq` reads from a response, upper-cased as `compute_mcq_accuracy`
    compares it: "A".."D", or "X" (the notebook's refusal mark, a valid answer that is never
    right); None for what the notebook counts invalid."""
    lines = response.split("\n")
    last = lines[-1].rstrip()
    if last:
        answer = _read_line(last)
    elif len(lines) < 2:
        answer = "Error"  # the notebook's `text.split('\n')[-2]` raises here and it records "Error"
    else:
        answer = _read_line(lines[-2].rstrip())
    if answer is None:
        answer = " ".join(lines)
    answer = answer.upper()
    return answer if answer in VALID_ANSWERS else None


def _read_line(line: str) -> str | None:
    if line[:2] in ("A)", "B)", "C)", "D)"):
        return line[0]
    if line[-1:] in LETTERS:
        return line[-1]
    if line.endswith("**"):
        # `last_line[-3]` whatever it is; on "**" alone it raises and the notebook records "Error".
        return line[-3] if len(line) >= 3 else "Error"
    return None


def load(path: Path) -> list[Question]:
    """The questions of a CTI-MCQ file (`data/cti-mcq.tsv`), in file order; a DapcError located
    at `file:line` for anything the official loader would not have read."""
    text = read_text(path, BENCHMARK)
    reader = csv.reader(io.StringIO(text), delimiter="\t")
    header = next(reader)
    require(
        header == COLUMNS,
        f"expected the tab-separated columns {', '.join(COLUMNS)}; found {', '.join(header)}",
        f"{path}:1",
    )
    questions = []
    for index, fields in enumerate(reader):
        location = f"{path}:{reader.line_num}"
        require(len(fields) == len(COLUMNS), f"row has {len(fields)} fields, expected {len(COLUMNS)}", location)
        record = dict(zip(COLUMNS, fields, strict=True))
        require(bool(record["Question"].strip()), '"Question" is empty', location)
        require(bool(record["Prompt"].strip()), '"Prompt" is empty', location)
        gold = normalize_gold(record["GT"])
        require(gold in LETTERS, f'GT is "{record["GT"]}", expected one of A, B, C, D', location)
        options = tuple(record[f"Option {letter}"] or EMPTY_OPTION for letter in LETTERS)
        question = Question(location, record["Question"], options, gold, prompt=record["Prompt"], id=str(index))
        questions.append(question)
    require(bool(questions), "no questions after the header", str(path))
    return questions


def generation_prompt(question: Question) -> Prompt:
    """The file's own `Prompt`, under the notebook's system prompt."""
    return Prompt(
        plain=f"{SYSTEM_PROMPT} {question.prompt}",
        chat=({"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question.prompt}),
    )


BENCHMARK = Benchmark(
    name="cti-mcq",
    published_at="https://github.com/xashru/cti-bench (data/cti-mcq.tsv; Hugging Face dataset AI4Sec/cti-bench)",
    description="The following are multiple choice questions (with answers) about cyber threat intelligence.\n\n",
    choices=LETTERS,
    load=load,
    generation_prompt=generation_prompt,
    extract=extract_letter,
    # The notebook's max_tokens: the prompt asks for reasoning, then the letter on the last line.
    max_new_tokens=2048,
    generation_shots=(0, 0),
    id_rule="the question's 0-based data row in the .tsv (0 is the question on line 2)",
    official_over_parsed=True,
)
