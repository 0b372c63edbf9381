"""The scorers, driven by scripted stand-in models: a model that always knows the answer scores
1.0 and one that always says "A" scores the share of A answers, in both modes, on every format."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from runtime.evaluate import (
    BENCHMARKS,
    Prompt,
    Question,
    score_generate,
    score_loglik,
    score_responses,
    wilson_interval,
)

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
FILES = {"cti-mcq": "cti-mcq.tsv", "cybermetric": "cybermetric.json", "seceval": "seceval.json"}
# How each benchmark's official rule expects an answer to be written.
REPLY = {
    "cti-mcq": lambda letters: f"Let me think about the options.\n{letters}",
    "cybermetric": lambda letters: f"ANSWER: {letters}",
    "seceval": lambda letters: f"Answer: {letters[::-1]}",  # any order: SecEval compares sets
}
A_SHARE = {"cti-mcq": 3 / 8, "cybermetric": 4 / 10, "seceval": 2 / 8}


class StandIn:
    """Answers each question with `pick(question)`: the letters it scores highest in log-likelihood
    mode, the letters it writes in generation mode. It finds the question being asked as the one
    whose text appears last in the prompt (earlier ones are worked examples)."""

    chat = False

    def __init__(self, questions: Sequence[Question], pick: Callable[[Question], str], reply: Callable[[str], str]):
        self.questions, self.pick, self.reply = questions, pick, reply
        self.calls = 0

    def _asked(self, prompt: str) -> Question:
        question = max(self.questions, key=lambda q: prompt.rfind(q.text.strip()))
        assert question.text.strip() in prompt
        return question

    def loglik(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        self.calls += 1
        return [
            0.0 if k.strip() == self.pick(self._asked(c)) else -1.0
            for c, k in zip(contexts, continuations, strict=True)
        ]

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
        self.calls += 1
        return [self.reply(self.pick(self._asked(p.plain))) for p in prompts]


def _load(name: str) -> list[Question]:
    return BENCHMARKS[name].load(FIXTURES / FILES[name])


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("mode", ["loglik", "generate"])
def test_model_that_knows_the_answers_scores_one_and_always_a_scores_the_share_of_a(name, mode):
    questions, benchmark = _load(name), BENCHMARKS[name]
    for pick, expected in ((lambda q: q.gold, 1.0), (lambda q: "A", A_SHARE[name])):
        model = StandIn(questions, pick, REPLY[name])
        if mode == "loglik":
            score = score_loglik(model, benchmark, questions, k_shot=2)
        else:
            score = score_generate(model, benchmark, questions)
        assert score.accuracy == expected
        assert (score.n, score.mode) == (len(questions), mode)
        assert model.calls == 1  # one batched call for all the questions


def test_loglik_prompt_has_k_worked_examples_never_the_question_itself():
    questions = _load("cybermetric")
    contexts: list[str] = []

    class Recorder(StandIn):
        def loglik(self, c, k):
            contexts.extend(c[::4])
            return super().loglik(c, k)

    score_loglik(Recorder(questions, lambda q: q.gold, str), BENCHMARKS["cybermetric"], questions, k_shot=3)
    assert contexts[0].count("\nAnswer:") == 4
    assert questions[0].text not in contexts[0].rsplit("\n\n", 1)[0]
    assert contexts[0].startswith(BENCHMARKS["cybermetric"].description + questions[1].text)
    assert contexts[5].count(questions[5].text) == 1


def test_seceval_reports_per_topic_accuracy():
    questions = _load("seceval")
    score = score_generate(StandIn(questions, lambda q: "A", REPLY["seceval"]), BENCHMARKS["seceval"], questions)
    assert score.per_topic["WebSecurity"].n == 3
    assert score.per_topic["WebSecurity"].correct == 1
    assert score.per_topic["Cryptography"].accuracy == 0.5


def test_generate_counts_unreadable_answers_as_wrong_and_unparsed():
    questions = _load("cybermetric")
    score = score_generate(
        StandIn(questions, lambda q: q.gold, lambda s: "no idea"), BENCHMARKS["cybermetric"], questions
    )
    assert (score.accuracy, score.unparsed) == (0.0, 10)


@pytest.mark.parametrize("name", FILES)
def test_supplied_responses_score_as_the_same_generated_responses(name):
    questions, benchmark = _load(name), BENCHMARKS[name]
    replies = [REPLY[name]("A") if i % 3 else "no idea" for i in range(len(questions))]

    class Scripted(StandIn):
        def generate(self, prompts, max_new_tokens):
            return replies

    generated = score_generate(Scripted(questions, str, str), benchmark, questions)
    supplied = score_responses(benchmark, questions, replies)
    assert (supplied.correct, supplied.unparsed, supplied.per_topic) == (
        generated.correct,
        generated.unparsed,
        generated.per_topic,
    )
    assert (supplied.mode, supplied.k_shot, supplied.prompt_sha256, supplied.missing) == ("responses", None, None, 0)


def test_cti_official_accuracy_divides_by_valid_answers_and_a_missing_response_is_unparsed():
    questions = _load("cti-mcq")  # golds A A B C A B C D
    score = score_responses(BENCHMARKS["cti-mcq"], questions, ["A", "x", "B", None, "A", "?", "C", "D"])
    assert (score.correct, score.unparsed, score.missing) == (5, 2, 1)
    assert (score.accuracy, score.official_accuracy) == (5 / 8, 5 / 6)
    nothing = score_responses(BENCHMARKS["cti-mcq"], questions, ["?"] * 8)
    assert (nothing.accuracy, nothing.official_accuracy) == (0.0, None)
    cybermetric = score_responses(BENCHMARKS["cybermetric"], _load("cybermetric"), ["ANSWER: A"] * 10)
    assert cybermetric.official_accuracy is None  # its official scorer divides by all questions


def test_limit_scores_the_first_questions_and_the_prompt_hash_tracks_the_prompts():
    questions = _load("cti-mcq")
    model = StandIn(questions, lambda q: q.gold, REPLY["cti-mcq"])
    first = score_loglik(model, BENCHMARKS["cti-mcq"], questions, k_shot=1, limit=3)
    again = score_loglik(model, BENCHMARKS["cti-mcq"], questions, k_shot=1, limit=3)
    other = score_loglik(model, BENCHMARKS["cti-mcq"], questions, k_shot=2, limit=3)
    assert first.n == 3
    assert first.prompt_sha256 == again.prompt_sha256 != other.prompt_sha256


def test_wilson_interval_matches_the_textbook_values():
    low, high = wilson_interval(71, 100)
    assert (round(low, 4), round(high, 4)) == (0.6146, 0.7899)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), pytest.approx(1.0))
