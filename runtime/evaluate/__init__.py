"""Evaluation before and after domain adaptation: multiple-choice benchmarks (CTI-MCQ, CyberMetric,
SecEval) scored by log-likelihood or by generation with each benchmark's official answer rule, and
perplexity on domain and general text, for any number of models side by side (base -> CPT -> SFT
-> DPO); or responses produced elsewhere, scored by the same rules. `evaluate_models` (N model
directories), `run_evaluation` (a model and its base) and `evaluate_responses` are the entry points;
`python -m runtime.evaluate` is their command line."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from runtime.evaluate.benchmarks import BENCHMARKS
from runtime.evaluate.common import Benchmark, LanguageModel, Prompt, Question, wilson_interval
from runtime.evaluate.perplexity import PerplexityScore, TextSource, perplexity
from runtime.evaluate.scoring import BenchmarkScore, TopicScore, score_generate, score_loglik, score_responses

if TYPE_CHECKING:
    from runtime.evaluate.from_responses import evaluate_responses
    from runtime.evaluate.hf_model import HFModel
    from runtime.evaluate.output import EvaluationResult
    from runtime.evaluate.run import evaluate_models, run_evaluation

# Loaded on first use: the model and the model evaluation import torch and transformers, which
# scoring supplied responses (`dapc eval --responses`) must not need; the writers import matplotlib,
# which reading a benchmark file (lm-eval's task utils) does not. A name here must not be that of a
# submodule: importing the submodule would set the package attribute to the module.
_LAZY = {
    "EvaluationResult": "runtime.evaluate.output",
    "evaluate_models": "runtime.evaluate.run",
    "evaluate_responses": "runtime.evaluate.from_responses",
    "HFModel": "runtime.evaluate.hf_model",
    "run_evaluation": "runtime.evaluate.run",
}


def __getattr__(name: str):
    """The lazily loaded names of `__all__`, imported when first asked for (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "evaluate_models",
    "evaluate_responses",
    "perplexity",
    "run_evaluation",
    "score_generate",
    "score_loglik",
    "score_responses",
    "wilson_interval",
]
