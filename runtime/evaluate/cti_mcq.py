"""CTI-MCQ from CTIBench (Alam et al., NeurIPS 2024 Datasets & Benchmarks): 2,500 four-option
questions on cyber threat intelligence, a tab-separated file with a ready-made generation prompt.

Official scoring, from github.com/xashru/cti-bench at commit cb79d156:
- `evaluation/model-prediction.ipynb`, `format_mcq`: the answer is read from the response's last
  line: a line starting "A)".."D)" gives that letter, a line ending in A..D gives its last
  character, a line ending in "**" gives the character three from the end; when the last line is
  empty the line before it is read the same way; otherwise the whole response (lines joined by
  spaces) is kept. We read the last non-empty line, which is the same for every response that ends
  in at most one newline.
- `evaluation/evaluation.ipynb`, `compute_mcq_accuracy`: `pred.upper() == gt.upper()`, which is
  how the one lower-case GT ("b", row 110) counts. That notebook divides by the responses that
  parsed (A-D or X); we divide by all questions and report the unparsed count, so a model that
  answers nothing readable scores 0, not 0/0. On the published responses both give the same
  numbers (GPT-4 71.00, GPT-3.5 54.12, LLAMA3-70B 65.76).
- The files were read with `pandas.read_csv(sep="\\t")`, which turns an empty cell into NaN; the
  shipped `Prompt` column therefore shows an empty option as "nan" (5 rows), and so do we.
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


def normalize_gold(gt: str) -> str:
    """The GT letter as the official scorer compares it: upper-cased."""
    return gt.strip().upper()


def extract_letter(response: str) -> str | None:
    """The answer letter (A-D) that `format_mcq` reads from a response, or None."""
    lines = [line.rstrip() for line in response.split("\n") if line.strip()]
    if lines:
        last = lines[-1]
        if last[:2] in ("A)", "B)", "C)", "D)"):
            return last[0]
        if last[-1] in LETTERS:
            return last[-1]
        if last.endswith("**") and len(last) >= 3 and last[-3] in LETTERS:
            return last[-3]
    # format_mcq keeps the joined text; evaluation.ipynb upper-cases it and compares it with GT.
    joined = " ".join(response.split("\n")).upper()
    return joined if joined in LETTERS else None


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
    for fields in reader:
        location = f"{path}:{reader.line_num}"
        require(len(fields) == len(COLUMNS), f"row has {len(fields)} fields, expected {len(COLUMNS)}", location)
        record = dict(zip(COLUMNS, fields, strict=True))
        require(bool(record["Question"].strip()), '"Question" is empty', location)
        require(bool(record["Prompt"].strip()), '"Prompt" is empty', location)
        gold = normalize_gold(record["GT"])
        require(gold in LETTERS, f'GT is "{record["GT"]}", expected one of A, B, C, D', location)
        options = tuple(record[f"Option {letter}"] or EMPTY_OPTION for letter in LETTERS)
        questions.append(Question(location, record["Question"], options, gold, prompt=record["Prompt"]))
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
)
