"""Benchmark files: the fixtures and the real files load as the official scorers read them, the
official answer rules reproduce published scores, and bad files fail with a located message."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dapc.errors import DapcError
from runtime.evaluate import cti_mcq, cybermetric, seceval

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
REAL = Path(__file__).parents[1] / ".." / "shared" / "data" / "benchmarks"

CTI_HEADER = "URL\tQuestion\tOption A\tOption B\tOption C\tOption D\tPrompt\tGT\n"


def test_cti_fixture_loads_with_crlf_nan_option_and_lowercase_gt():
    questions = cti_mcq.load(FIXTURES / "cti-mcq.tsv")
    assert [q.gold for q in questions] == ["A", "A", "B", "C", "A", "B", "C", "D"]
    assert [q.id for q in questions] == [str(i) for i in range(8)]
    assert questions[5].options == ("Enterprise", "ICS", "Mobile", "nan")
    assert questions[5].row == f"{FIXTURES / 'cti-mcq.tsv'}:7"
    assert not any("\r" in q.prompt for q in questions)


def test_cybermetric_and_seceval_fixtures_load():
    cm = cybermetric.load(FIXTURES / "cybermetric.json")
    assert [q.gold for q in cm] == list("ABACDABCAB")
    assert [q.id for q in cm] == [str(i) for i in range(10)]
    se = seceval.load(FIXTURES / "seceval.json")
    assert [q.gold for q in se] == ["A", "AC", "B", "ABD", "A", "CD", "BC", "D"]
    assert se[1].id == "fixture-1"
    assert se[1].options[0] == "Setting the HttpOnly flag"
    assert se[1].topics == ("WebSecurity", "ApplicationSecurity")


def test_cti_official_rule_scores_published_responses():
    rows = list(csv.DictReader((REAL / "cti-mcq" / "cti-mcq-responses.tsv").open(newline=""), delimiter="\t"))
    accuracy = {
        model: round(
            100 * sum(cti_mcq.extract_letter(r[model]) == cti_mcq.normalize_gold(r["GT"]) for r in rows) / len(rows), 2
        )
        for model in ("ChatGPT-4", "ChatGPT-3.5", "LLAMA3-70B")
    }
    assert accuracy == {"ChatGPT-4": 71.00, "ChatGPT-3.5": 54.12, "LLAMA3-70B": 65.76}


def test_real_cti_file_loads_with_its_quirks():
    questions = cti_mcq.load(REAL / "cti-mcq" / "cti-mcq.tsv")
    assert len(questions) == 2500
    assert sum("nan" in q.options for q in questions) == 5
    assert questions[108].gold == "B"  # written "b" on line 110
    assert questions[108].row.endswith("cti-mcq.tsv:110")


def test_real_seceval_file_keeps_empty_and_doubled_answers():
    questions = seceval.load(REAL / "seceval" / "questions.json")
    assert len(questions) == 2189
    assert sum(q.gold == "" for q in questions) == 7
    assert sum(q.gold == "AA" for q in questions) == 2


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("The technique is used for persistence.\nC", "C"),
        ("Reasoning...\n\nB) Persistence\n", "B"),
        ("Final answer: **D**", "D"),
        ("d", "D"),
        ("I cannot tell.", None),
        ("", None),
        ("Answer: C\r\n", "C"),
        ("x", "X"),  # the notebook's refusal mark: a valid answer, never right
        ("**Answer: b**", "B"),  # `last_line[-3]`, then compared upper-cased
        ("**", None),  # `last_line[-3]` raises: the notebook records "Error"
        ("B\n\n", None),  # format_mcq looks back one line only, then keeps the whole text
        ("B\n\nFinal answer as asked above.", None),
    ],
)
def test_cti_extract_letter_reads_the_last_line_as_format_mcq_does(response, letter):
    assert cti_mcq.extract_letter(response) == letter


@pytest.mark.parametrize(
    ("response", "letter"),
    [("ANSWER: B", "B"), ("answer c", "C"), ("The answer is... ANSWER:D then ANSWER: A", "D"), ("B", None)],
)
def test_cybermetric_extract_letter_uses_the_official_regex(response, letter):
    assert cybermetric.extract_letter(response) == letter


def test_seceval_answers_match_as_sets():
    assert seceval.extract_letters("Answer: CA") == "AC" == seceval.normalize_gold("CA")
    assert seceval.extract_letters("Answer: AC") == seceval.normalize_gold("AC")
    assert seceval.extract_letters("Answer: A") != seceval.normalize_gold("AC")
    assert seceval.extract_letters("Answer: AAC") == "AC"
    assert seceval.normalize_gold("AA") == "AA"  # as in eval.py, no response set can match it


def test_missing_file_names_it_and_where_the_benchmark_is_published(tmp_path):
    with pytest.raises(DapcError) as e:
        cti_mcq.load(tmp_path / "cti-mcq.tsv")
    assert str(e.value) == (
        f"{tmp_path / 'cti-mcq.tsv'}: cti-mcq benchmark file not found; it is published at "
        "https://github.com/xashru/cti-bench (data/cti-mcq.tsv; Hugging Face dataset AI4Sec/cti-bench)"
    )


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("", "", "file is empty; expected a cti-mcq file"),
        (
            "URL\tQuestion\tGT\nx\ty\tA\n",
            ":1",
            "expected the tab-separated columns URL, Question, "
            "Option A, Option B, Option C, Option D, Prompt, GT; found URL, Question, GT",
        ),
        (CTI_HEADER + "u\tq\ta\tb\tc\td\tp\tA\r\nu\tq\ta\tb\tc\n", ":3", "row has 5 fields, expected 8"),
        (CTI_HEADER + "u\tq\ta\tb\tc\td\tp\tE\n", ":2", 'GT is "E", expected one of A, B, C, D'),
        (CTI_HEADER + "u\t \ta\tb\tc\td\tp\tA\n", ":2", '"Question" is empty'),
        (CTI_HEADER, "", "no questions after the header"),
    ],
)
def test_malformed_cti_file_is_refused_with_file_and_row(tmp_path, text, where, message):
    path = tmp_path / "cti-mcq.tsv"
    path.write_text(text)
    with pytest.raises(DapcError) as e:
        cti_mcq.load(path)
    assert str(e.value) == f"{path}{where}: {message}"


@pytest.mark.parametrize(
    ("document", "where", "message"),
    [
        (
            '{"questions": [\n  {"question": "q",}\n]}',
            ":2:20",
            "not valid JSON: Expecting property name enclosed in double quotes",
        ),
        ('[{"question": "q"}]', "", 'expected a JSON object with a "questions" list'),
        (
            json.dumps(
                {
                    "questions": [
                        {"question": "q", "answers": {"A": "1", "B": "2", "C": "3", "D": "4"}, "solution": "A"},
                        {"question": "q", "answers": {"A": "1", "B": "2"}, "solution": "A"},
                    ]
                }
            ),
            ":questions[1]",
            '"answers" must map exactly A, B, C, D to option texts',
        ),
        (
            json.dumps(
                {"questions": [{"question": "q", "answers": {"A": "1", "B": "2", "C": "3", "D": "4"}, "solution": "E"}]}
            ),
            ":questions[0]",
            "\"solution\" is 'E', expected one of A, B, C, D",
        ),
    ],
)
def test_malformed_cybermetric_file_is_refused_with_file_and_record(tmp_path, document, where, message):
    path = tmp_path / "CyberMetric-80-v1.json"
    path.write_text(document)
    with pytest.raises(DapcError) as e:
        cybermetric.load(path)
    assert str(e.value) == f"{path}{where}: {message}"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"choices": ["A: 1", "B: 2", "C: 3", "D: 4"], "answer": "AE", "topics": []},
            '"answer" is \'AE\', expected letters from A, B, C, D such as "AC"',
        ),
        (
            {"choices": ["1", "2", "3", "4"], "answer": "A", "topics": []},
            '"choices" must be 4 strings starting "A: ", "B: ", "C: ", "D: "',
        ),
        (
            {"choices": ["A: 1", "B: 2", "C: 3", "D: 4"], "answer": "A", "topics": "Web"},
            '"topics" must be a list of strings',
        ),
        (
            {"question": "", "choices": ["A: 1", "B: 2", "C: 3", "D: 4"], "answer": "A", "topics": []},
            '"question" must be a non-empty string',
        ),
    ],
)
def test_malformed_seceval_record_is_refused_with_file_and_record(tmp_path, record, message):
    path = tmp_path / "questions.json"
    good = {"question": "q", "choices": ["A: 1", "B: 2", "C: 3", "D: 4"], "answer": "B", "topics": ["Web"]}
    path.write_text(json.dumps([good, {"question": "q", **record}]))
    with pytest.raises(DapcError) as e:
        seceval.load(path)
    assert str(e.value) == f"{path}:[1]: {message}"
