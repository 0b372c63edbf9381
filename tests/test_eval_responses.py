"""Scoring responses produced elsewhere (`dapc eval --responses MODEL:BENCHMARK=FILE`): CTIBench's
published CTI-MCQ answers of five models score exactly the paper's numbers through the official rule,
the comparison lists N models with changes from a baseline, gaps are counted as unparsed, a bad
line is one located error, and no model library is imported."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dapc.cli import main
from tests.conftest import REPO, SHARED

CTI_MCQ = SHARED / "data" / "benchmarks" / "cti-mcq" / "cti-mcq.tsv"
# The CC BY-NC-SA data is read from ../shared, never copied into the repository.
PUBLISHED = SHARED / "data" / "benchmarks" / "cti-mcq" / "cti-mcq-responses.tsv"
FIXTURE = REPO / "tests" / "fixtures" / "benchmarks" / "cti-mcq.tsv"
# CTIBench (Alam et al., 2024), CTI-MCQ accuracy (%) as evaluation.ipynb computes it.
OFFICIAL_PERCENT = {
    "ChatGPT-3.5": 54.12,
    "ChatGPT-4": 71.00,
    "Gemini-1.5": 65.44,
    "LLAMA3-70B": 65.76,
    "LLAMA3-8B": 61.32,
}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _eval(*args: str):
    return CliRunner().invoke(main, ["eval", *map(str, args)])


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    """One responses JSONL per model of the published response sheet (row i answers question i)."""
    rows = list(csv.DictReader(PUBLISHED.open(newline="", encoding="utf-8"), delimiter="\t"))
    root = tmp_path_factory.mktemp("responses")
    return {
        model: _write_jsonl(root / f"{model}.jsonl", [{"id": i, "response": row[model]} for i, row in enumerate(rows)])
        for model in OFFICIAL_PERCENT
    }


@pytest.fixture(scope="module")
def published_eval(published, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval")
    flags = [f for model, path in published.items() for f in ("--responses", f"{model}:cti-mcq={path}")]
    result = _eval("--benchmark", f"cti-mcq={CTI_MCQ}", *flags, "--out", out)
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "results.json").read_text())


def test_published_cti_mcq_responses_score_the_papers_accuracy(published_eval):
    _, results = published_eval
    scores = {model: results["models"][model]["benchmarks"]["cti-mcq"] for model in OFFICIAL_PERCENT}
    official = {model: round(100 * score["official_accuracy"], 2) for model, score in scores.items()}
    print("official CTI-MCQ accuracy (%):", official)
    assert official == OFFICIAL_PERCENT
    # Every published answer is valid (A-D, or Gemini's 4 refusals "X"), so both divisions agree.
    assert {model: round(100 * score["accuracy"], 2) for model, score in scores.items()} == OFFICIAL_PERCENT
    assert {(s["n"], s["unparsed"], s["missing"], s["mode"]) for s in scores.values()} == {(2500, 0, 0, "responses")}
    assert scores["Gemini-1.5"]["correct"] == 1636


def test_comparison_lists_all_five_models_and_the_chart_is_written(published_eval):
    out, results = published_eval
    assert results["model_order"] == list(OFFICIAL_PERCENT) and results["baseline"] is None
    assert (out / "comparison.md").read_text().splitlines() == [
        "| metric | detail | ChatGPT-3.5 | ChatGPT-4 | Gemini-1.5 | LLAMA3-70B | LLAMA3-8B |",
        "|---|---|---:|---:|---:|---:|---:|",
        "| cti-mcq accuracy (%) | n=2500, responses | 54.12 [52.2, 56.1] | 71.00 [69.2, 72.7] | 65.44 [63.6, 67.3] "
        "| 65.76 [63.9, 67.6] | 61.32 [59.4, 63.2] |",
        "| cti-mcq official accuracy (%) | correct / valid answers, as the official scorer divides "
        "| 54.12 | 71.00 | 65.44 | 65.76 | 61.32 |",
        "| cti-mcq unparsed answers | of 2500, missing responses included | 0 | 0 | 0 | 0 | 0 |",
    ]
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baseline_comes_first_and_each_other_model_shows_its_change(tmp_path):
    # Fixture golds: A A B C A B C D. base answers "A" to all (3 right), cpt misses one, sft is right.
    golds = "AABCABCD"
    answers = {"base": "AAAAAAAA", "sft": golds, "cpt": golds[:7] + "A"}
    flags = []
    for model, letters in answers.items():
        records = [{"id": i, "response": f"So:\n{letter}"} for i, letter in enumerate(letters)]
        path = _write_jsonl(tmp_path / f"{model}.jsonl", records)
        flags += ["--responses", f"{model}:cti-mcq={path}"]
    result = _eval("--benchmark", f"cti-mcq={FIXTURE}", *flags, "--baseline", "base", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "comparison.md").read_text().splitlines()[:4] == [
        "| metric | detail | base | sft | cpt | change: sft | change: cpt |",
        "|---|---|---:|---:|---:|---:|---:|",
        "| cti-mcq accuracy (%) | n=8, responses | 37.50 [13.7, 69.4] | 100.00 [67.6, 100.0] "
        "| 87.50 [52.9, 97.8] | +62.50 pts | +50.00 pts |",
        "| cti-mcq official accuracy (%) | correct / valid answers, as the official scorer divides "
        "| 37.50 | 100.00 | 87.50 | +62.50 pts | +50.00 pts |",
    ]


def test_questions_without_a_response_are_counted_and_scored_unparsed(tmp_path):
    # Question 2 unanswered; question 1's response ends in two newlines, which the notebook does not read.
    path = _write_jsonl(tmp_path / "m.jsonl", [{"id": 0, "response": "A"}, {"id": "1", "response": "A\n\n"}])
    result = _eval("--benchmark", f"cti-mcq={FIXTURE}", "--responses", f"m:cti-mcq={path}", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"warning: m cti-mcq: 6 of 8 questions have no response in {path}; scored as unparsed\n" in result.stderr
    score = json.loads((tmp_path / "out" / "results.json").read_text())["models"]["m"]["benchmarks"]["cti-mcq"]
    assert (score["correct"], score["unparsed"], score["missing"]) == (1, 7, 6)
    assert (score["accuracy"], score["official_accuracy"]) == (1 / 8, 1.0)
    assert (tmp_path / "out" / "comparison.md").read_text().splitlines()[-2:] == [
        "| cti-mcq unparsed answers | of 8, missing responses included | 7 |",
        "| cti-mcq questions without a response | of 8, scored as unparsed | 6 |",
    ]


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ('{"id": 1, "response": "B"', "not valid JSON: Expecting ',' delimiter (column 26)"),
        (
            '{"id": 8, "response": "B"}',
            "id 8 is not one of the 8 cti-mcq questions; a cti-mcq id is the question's 0-based data row in the "
            ".tsv (0 is the question on line 2)",
        ),
        ('{"id": "0", "response": "B"}', 'id "0" is answered twice, first on line 1'),
        (
            '{"response": "B"}',
            'no "id": a cti-mcq id is the question\'s 0-based data row in the .tsv (0 is the question on line 2)',
        ),
        ('{"id": 1, "response": null}', '"response" must be a string, found null'),
        ('["B"]', 'expected an object {"id": ..., "response": "text"}, found a list'),
    ],
)
def test_bad_responses_line_exits_2_with_one_line_naming_file_and_line(tmp_path, second_line, message):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": 0, "response": "A"}\n' + second_line + "\n")
    result = _eval("--benchmark", f"cti-mcq={FIXTURE}", "--responses", f"m:cti-mcq={path}", "--out", tmp_path / "out")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == f"error: {path}:2: {message}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--responses", "m:cti_mcq={jsonl}"], "responses of m to 'cti_mcq': unknown benchmark; known: cti-mcq, "
         "cybermetric, seceval"),
        (["--responses", "m:seceval={jsonl}"], "responses of m to seceval need the seceval file: add --benchmark "
         "seceval=PATH"),
        (["--responses", "m:cti-mcq={jsonl}", "--baseline", "base"], "baseline 'base' is not one of the models "
         "with responses: m"),
        (["--responses", "m=x.jsonl"], "python -m runtime.evaluate: argument --responses: expected "
         "MODEL:BENCHMARK=FILE with BENCHMARK one of cti-mcq, cybermetric, seceval, got 'm=x.jsonl' (see --help)"),
        (["--responses", "m:cti-mcq={jsonl}", "--mode", "generate"], "python -m runtime.evaluate: --responses "
         "scores answers without a model: drop --mode (see --help)"),
    ],
)
def test_inconsistent_flags_exit_2_with_one_line(tmp_path, flags, message):
    jsonl = _write_jsonl(tmp_path / "m.jsonl", [{"id": 0, "response": "A"}])
    flags = [flag.format(jsonl=jsonl) for flag in flags]
    result = _eval("--benchmark", f"cti-mcq={FIXTURE}", *flags, "--out", tmp_path / "out")
    assert (result.exit_code, result.stderr) == (2, f"error: {message}\n")


def test_scoring_responses_imports_neither_torch_nor_transformers(published, tmp_path):
    script = (
        "import sys\n"
        "from dapc.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print(code, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n"
    )
    args = ["eval", "--benchmark", f"cti-mcq={CTI_MCQ}", "--responses", f"gpt4:cti-mcq={published['ChatGPT-4']}",
            "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout == "0 []\n", done.stderr
    assert (tmp_path / "results.json").is_file()
