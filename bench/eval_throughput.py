"""Questions per second of dapc's batched log-likelihood scorer against a naive loop (one question
at a time, one forward pass per option, same tokenization and scoring), on a random-init tiny
Llama with the 32,000-piece Mistral tokenizer, in one run. Both pick the same answers.

    python bench/eval_throughput.py [--questions 200] [--k-shot 5] [--device cpu|cuda]

Reads CTI-MCQ from ../shared/data/benchmarks when it is there, else the test fixture.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime.evaluate import BENCHMARKS, HFModel, score_loglik  # noqa: E402
from runtime.evaluate.common import loglik_context  # noqa: E402
from tests.test_eval_tiny_model import build_tiny_llama  # noqa: E402  (the same model the tests score)

REAL = REPO.parent / "shared" / "data" / "benchmarks" / "cti-mcq" / "cti-mcq.tsv"
FIXTURE = REPO / "tests" / "fixtures" / "benchmarks" / "cti-mcq.tsv"


def naive_picks(model: HFModel, contexts: list[str], choices: tuple[str, ...]) -> list[str]:
    """For each question, each option scored by its own `loglik` call: one forward pass each."""
    picks = []
    for context in contexts:
        scores = [model.loglik([context], [" " + choice])[0] for choice in choices]
        picks.append(choices[scores.index(max(scores))])
    return picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--k-shot", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    benchmark = BENCHMARKS["cti-mcq"]
    source = REAL if REAL.is_file() else FIXTURE
    questions = benchmark.load(source)
    n = min(args.questions, len(questions))
    with tempfile.TemporaryDirectory() as tmp:
        model = HFModel(build_tiny_llama(Path(tmp) / "model", seed=0), device=args.device)
        print(f"model: tiny Llama, {sum(p.numel() for p in model.model.parameters()):,} parameters, {model.device}")
        print(f"questions: {n} from {source.name}, {args.k_shot}-shot, {len(benchmark.choices)} options each")

        start = time.perf_counter()
        score = score_loglik(model, benchmark, questions, k_shot=args.k_shot, limit=n)
        batched_seconds = time.perf_counter() - start

        contexts = [loglik_context(benchmark, questions, i, args.k_shot) for i in range(n)]
        start = time.perf_counter()
        naive = naive_picks(model, contexts, benchmark.choices)
        naive_seconds = time.perf_counter() - start

    naive_correct = sum(pick == q.gold for pick, q in zip(naive, questions[:n], strict=True))
    print(f"batched: {n / batched_seconds:8.1f} questions/s ({batched_seconds:.2f} s, accuracy {score.accuracy:.4f})")
    print(f"naive:   {n / naive_seconds:8.1f} questions/s ({naive_seconds:.2f} s, accuracy {naive_correct / n:.4f})")
    print(f"speed-up: {naive_seconds / batched_seconds:.1f}x")


if __name__ == "__main__":
    main()
