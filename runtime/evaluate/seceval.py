"""SecEval (Li et al., Tencent Xuanwu Lab, 2023): 2,189 cybersecurity questions with four
choices and one or more correct letters, `questions.json`: a list of records `id, source,
question, choices` ("A: ..".."D: .."), `answer` (e.g. "B", "AC") and `topics`.

Official scoring, from github.com/XuanwuAI/SecEval `eval/eval.py` as last changed in commit
affa5713 (code under MIT): "Answer:" is removed from the response, the answer is the sorted set
of the capitals A-D left in it, and the question counts when that string equals `answer`
(case-insensitive); the score is reported overall (each question once) and per topic, a question
counting once under each of its topics (`count_score_by_topic`). We compare with `answer` sorted,
so "CA" and "AC" are the same set; the file's quirks are kept as the official scorer has them:
7 empty answers match only a response with no letter A-D in it, and 2 "AA" answers match nothing
(a set has no repeated letter). In log-likelihood mode the 15 non-empty letter sets are scored,
so those 9 questions count wrong.

A supplied response's id is the record's own "id" (a string such as
"282cd7f6-86f9-4174-95c2-df26b2b6395e").
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from runtime.evaluate.common import LETTERS, Benchmark, Prompt, Question, read_json, require, require_text

# eval.py's instruction, its 5 worked examples for base models and its 1 for chat models.
INSTRUCTION = (
    "Below are multiple-choice questions concerning cybersecurity. "
    "Please select the correct answers and respond with the letters ABCD only."
)
FEW_SHOT = (
    "\n"
    "Question: You are reviewing a piece of code to identify potential vulnerabilities related to "
    "NULL pointer dereferences. Which of the following strategies should you consider implementing "
    "to mitigate the risk? Choose all that apply. A: Use a programming language that inherently "
    "manages pointers and prevents direct memory access. B: Apply input validation to all variables "
    "and data stores that receive data from external sources to ensure they are initialized to "
    "expected values. C: Explicitly initialize all variables and other data stores, either during "
    "declaration or just before the first usage. D: Implement a custom memory management system that "
    "automatically assigns a unique identifier to each pointer.\n"
    "Answer: ABC \n"
    "Question: Analyze the code snippet provided. Which of the following practices should be "
    "implemented in a multithreaded application to prevent NULL pointer dereference vulnerabilities? "
    "Select all that apply.A: Ensure that proper locking APIs are used to lock the pointer before "
    "the if statement and unlock when it has finished to prevent race conditions. B: Check the "
    "return value of all functions that return a value, including network-related functions, and "
    "verify that it is non-null before using it.C: Use automated static analysis tools that target "
    "this type of weakness, understanding that while not perfect, they can still be effective.D: "
    "Verify that a non-nil 'response' is present before deferring 'response.Body.Close()' to handle "
    "cases where the 'Do' method returns an error.\n"
    "Answer: ABCD \n"
    "Question: In a bank management application, a method called `createBankAccount` allows the "
    "creation of bank accounts without user identity verification or authority checks. Based on "
    "common security practices, which of the following measures would improve security?A: Implement "
    "a centralized authentication mechanism for operations that require a proven user identity.B: "
    "Duplicate client-side authentication checks on the server side to prevent bypassing of security "
    "checks.C: Use a vetted library or framework that offers robust authentication capabilities to "
    "prevent security weaknesses.D: Apply strong authentication requirements for all users accessing "
    "data stored in the cloud.\n"
    "Answer: ABCD\n"
    "Question: What are the potential consequences if an application handling sensitive data does "
    "not require authentication for data access, and what are the appropriate mitigation "
    "strategies?A: Attackers could easily access sensitive data from any location; require strong "
    "authentication for data access using cloud provider controls.B: Security checks might be "
    "bypassed if only performed on the client side; implement checks on both client and server "
    "sides.C: Unauthenticated users could alter product functionality; do not use authentication for "
    "critical functionality in products.D: Sensitive data may be accessed without proper "
    "credentials; utilize authentication capabilities provided by the framework or operating system.\n"
    "Answer: ABD\n"
    "Question: To prevent security vulnerabilities related to deserialization of untrusted data in a "
    "Java application, which of the following practices should a developer implement?A: Use the "
    "signing/sealing features of the programming language to assure that deserialized data has not "
    "been tainted.B: Explicitly define a final readObject() method to throw an exception and prevent "
    "deserialization.C: Populate a new object by deserializing data to ensure data flows through "
    "safe input validation functions.D: Make fields transient to protect them from deserialization "
    "and prevent carrying over sensitive variables.\n"
    "Answer: ABCD\n"
)
CHAT_FEW_SHOT = (
    {
        "role": "user",
        "content": "Question: Which mitigation prevent stack overflow bug? "
        "A: Stack Canary. B: ALSR. C: CFI. D: Code Signing.",
    },
    {"role": "assistant", "content": "Answer: ABC"},
)

# Every non-empty set of letters, smallest first: "A" .. "D", "AB" .. "CD", .., "ABCD".
LETTER_SETS = tuple("".join(s) for size in range(1, 5) for s in itertools.combinations(LETTERS, size))


def normalize_gold(answer: str) -> str:
    """`answer` as it is compared: upper-cased, letters sorted, repeats kept ("CA" -> "AC")."""
    return "".join(sorted(answer.upper()))


def extract_letters(response: str) -> str:
    """The sorted set of capitals A-D in a response once "Answer:" is removed, e.g. "AC"; ""
    when there are none."""
    return "".join(sorted(set(re.findall(r"[A-D]", response.replace("Answer:", "")))))


def load(path: Path) -> list[Question]:
    """The questions of SecEval's `questions.json`, in file order; a DapcError located at
    `file:[i]` for a record the official evaluator could not use."""
    records = read_json(path, BENCHMARK)
    require(isinstance(records, list), "expected a JSON list of question records", str(path))
    require(bool(records), "the list of questions is empty", str(path))
    questions = []
    for index, record in enumerate(records):
        location = f"{path}:[{index}]"
        require(isinstance(record, dict), "expected an object", location)
        text = require_text(record, "question", location)
        choices = record.get("choices")
        require(
            isinstance(choices, list)
            and len(choices) == 4
            and all(
                isinstance(c, str) and c.startswith(f"{letter}: ") for letter, c in zip(LETTERS, choices, strict=True)
            ),
            '"choices" must be 4 strings starting "A: ", "B: ", "C: ", "D: "',
            location,
        )
        answer = record.get("answer")
        require(
            isinstance(answer, str) and all(letter in LETTERS for letter in answer.upper()),
            f'"answer" is {answer!r}, expected letters from A, B, C, D such as "AC"',
            location,
        )
        topics = record.get("topics")
        require(
            isinstance(topics, list) and all(isinstance(t, str) for t in topics),
            '"topics" must be a list of strings',
            location,
        )
        options = tuple(c[3:] for c in choices)
        # eval.py never reads "id"; only supplied responses need it, so its absence is refused there.
        question_id = record.get("id") if isinstance(record.get("id"), str) else ""
        questions.append(Question(location, text, options, normalize_gold(answer), tuple(topics), id=question_id))
    return questions


def generation_prompt(question: Question) -> Prompt:
    """eval.py's prompt: the instruction, its worked examples, then the question on one line."""
    choices = " ".join(f"{letter}: {option}" for letter, option in zip(LETTERS, question.options, strict=True))
    line = ("Question: " + question.text + choices).replace("\n", " ")
    return Prompt(
        plain=INSTRUCTION + FEW_SHOT + line + "\n",
        chat=({"role": "system", "content": INSTRUCTION}, *CHAT_FEW_SHOT, {"role": "user", "content": line}),
    )


BENCHMARK = Benchmark(
    name="seceval",
    published_at="https://huggingface.co/datasets/XuanwuAI/SecEval (questions.json; code: github.com/XuanwuAI/SecEval)",
    description=INSTRUCTION + "\n\n",
    choices=LETTER_SETS,
    load=load,
    generation_prompt=generation_prompt,
    extract=extract_letters,
    # eval.py's pipeline_kwargs max_new_tokens.
    max_new_tokens=5,
    generation_shots=(5, 1),
    id_rule='the record\'s own "id" string in questions.json',
)
