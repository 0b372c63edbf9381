"""The lm-eval task YAMLs in runtime/lm_eval_tasks ask what dapc asks and score it the same way.
lm-eval is a test dependency (the `test` extra), not a runtime one."""

from __future__ import annotations

from pathlib import Path

import lm_eval
import pytest
from lm_eval.tasks import TaskManager

from runtime.evaluate import BENCHMARKS, HFModel, score_generate, score_loglik
from runtime.evaluate.common import loglik_context
from tests.test_eval_tiny_model import BENCHMARK_FILES, build_tiny_llama

TASKS_DIR = Path(__file__).parents[1] / "runtime" / "lm_eval_tasks"
METADATA = {name.replace("-", "_"): str(path) for name, path in BENCHMARK_FILES.items()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("lm_eval") / "model", seed=0)


def _lm_eval(model_dir: Path, tasks: list[str], **kwargs) -> dict:
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=tasks,
        device="cpu",
        batch_size=8,
        log_samples=True,
        task_manager=TaskManager(include_path=str(TASKS_DIR), metadata=METADATA),
        **kwargs,
    )


def test_loglik_tasks_reproduce_dapc_scores_and_logliks(model_dir):
    results = _lm_eval(model_dir, ["cti_mcq", "cybermetric", "seceval"], num_fewshot=2)
    model = HFModel(model_dir, device="cpu")
    for name in BENCHMARK_FILES:
        task, benchmark = name.replace("-", "_"), BENCHMARKS[name]
        questions = benchmark.load(BENCHMARK_FILES[name])
        ours = score_loglik(model, benchmark, questions, k_shot=2)
        assert results["results"][task]["acc,none"] == ours.accuracy
        for sample in results["samples"][task]:
            context = loglik_context(benchmark, questions, sample["doc_id"], k_shot=2)
            continuations = [" " + choice for choice in benchmark.choices]
            assert [tuple(a) for a in sample["arguments"]] == [(context, k) for k in continuations]
            theirs = [float(resp[0][0]) for resp in sample["resps"]]
            assert model.loglik([context] * len(theirs), continuations) == pytest.approx(theirs, abs=1e-4)


def test_generation_tasks_reproduce_dapc_scores(model_dir):
    results = _lm_eval(
        model_dir, ["cti_mcq_gen", "cybermetric_gen", "seceval_gen"], limit=4, gen_kwargs="max_gen_toks=8"
    )
    model = HFModel(model_dir, device="cpu")
    for name in BENCHMARK_FILES:
        questions = BENCHMARKS[name].load(BENCHMARK_FILES[name])
        ours = score_generate(model, BENCHMARKS[name], questions, max_new_tokens=8, limit=4)
        assert results["results"][f"{name.replace('-', '_')}_gen"]["acc,none"] == ours.accuracy
