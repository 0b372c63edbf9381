"""Evaluation before and after domain adaptation: multiple-choice benchmarks (CTI-MCQ, CyberMetric,
SecEval) scored by log-likelihood or by generation with each benchmark's official answer rule, and
perplexity on domain and general text. `run_evaluation` is the entry point; `python -m
runtime.evaluate` is its command line."""

from runtime.evaluate.common import Benchmark, LanguageModel, Prompt, Question, wilson_interval
from runtime.evaluate.hf_model import HFModel
from runtime.evaluate.perplexity import PerplexityScore, TextSource, perplexity
from runtime.evaluate.run import BENCHMARKS, EvaluationResult, run_evaluation
from runtime.evaluate.scoring import BenchmarkScore, TopicScore, score_generate, score_loglik

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkScore",
    "EvaluationResult",
    "HFModel",
    "LanguageModel",
    "PerplexityScore",
    "Prompt",
    "Question",
    "TextSource",
    "TopicScore",
    "perplexity",
    "run_evaluation",
    "score_generate",
    "score_loglik",
    "wilson_interval",
]
