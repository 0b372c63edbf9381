"""lm-evaluation-harness glue for the task YAMLs beside this file: the documents come from dapc's
own loaders and prompts, and generated answers are read by dapc's copies of the official rules,
so `lm_eval --include_path runtime/lm_eval_tasks --tasks cti_mcq,...` asks what
`python -m runtime.evaluate` asks and scores it the same way.

Benchmark files are passed as lm-eval metadata, keyed by task family:
`--metadata '{"cti_mcq": "PATH", "cybermetric": "PATH", "seceval": "PATH"}'`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datasets

from runtime.evaluate import BENCHMARKS
from runtime.evaluate.common import question_text


def _documents(name: str, metadata: dict) -> dict[str, datasets.Dataset]:
    """The benchmark's questions as lm-eval documents, in a single "test" split. `gold` is the
    answer as letters; lm-eval scores an answer that is not among `choices` (SecEval's empty
    and "AA" answers) as wrong, as dapc does."""
    key = name.replace("-", "_")
    if key not in metadata:
        raise ValueError(f"""pass the {name} file to lm-eval: --metadata '{{"{key}": "PATH"}}'""")
    benchmark = BENCHMARKS[name]
    documents = [
        {
            "row": q.row,
            "description": benchmark.description,
            "text": question_text(q),
            "choices": list(benchmark.choices),
            "gold": q.gold,
            "plain": benchmark.generation_prompt(q).plain,
        }
        for q in benchmark.load(Path(metadata[key]))
    ]
    return {"test": datasets.Dataset.from_list(documents)}


def cti_mcq(**metadata) -> dict[str, datasets.Dataset]:
    """CTI-MCQ documents (`custom_dataset` of cti_mcq.yaml and cti_mcq_gen.yaml)."""
    return _documents("cti-mcq", metadata)


def cybermetric(**metadata) -> dict[str, datasets.Dataset]:
    """CyberMetric documents (`custom_dataset` of cybermetric.yaml and cybermetric_gen.yaml)."""
    return _documents("cybermetric", metadata)


def seceval(**metadata) -> dict[str, datasets.Dataset]:
    """SecEval documents (`custom_dataset` of seceval.yaml and seceval_gen.yaml)."""
    return _documents("seceval", metadata)


def _process_generation(name: str) -> Callable[[dict, list[str]], dict[str, float]]:
    extract = BENCHMARKS[name].extract

    def process(doc: dict, results: list[str]) -> dict[str, float]:
        """acc 1.0 when the official rule reads the gold letters from the generated answer."""
        return {"acc": float(extract(results[0]) == doc["gold"])}

    return process


process_cti_mcq_gen = _process_generation("cti-mcq")
process_cybermetric_gen = _process_generation("cybermetric")
process_seceval_gen = _process_generation("seceval")
