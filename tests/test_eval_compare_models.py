"""`python -m runtime.evaluate --model [NAME=]DIR ...` on three tiny Llamas (different seeds) standing for a
CPT -> SFT -> DPO chain: one command scores them in the order given, one in memory at a time, and writes a
column per model and each later model's change from the first; `NAME=DIR` heads the columns; a bad directory
or a name given twice is one line on stderr and exit 2, before any model loads."""

from __future__ import annotations

import contextlib
import io
import json
import weakref
from pathlib import Path

import pytest

from runtime.evaluate import HFModel
from runtime.evaluate import run as run_module
from runtime.evaluate.__main__ import main
from tests.test_eval_tiny_model import BENCHMARK_FILES, TEXT, build_tiny_llama

STAGES = ("cpt", "sft", "dpo")
EXPORTS = [f"{stage}/export" for stage in STAGES]
BENCHMARKS = [arg for name, path in BENCHMARK_FILES.items() for arg in ("--benchmark", f"{name}={path}")]
SMALL = ["--limit", "2", "--k-shot", "1", "--device", "cpu"]
PERPLEXITY = ["--domain-text", "domain.txt", "--ppl-seq-len", "64", "--ppl-max-tokens", "192"]
ONE_QUESTION = ["--benchmark", f"cti-mcq={BENCHMARK_FILES['cti-mcq']}", "--limit", "1", "--k-shot", "0", "--device",
                "cpu"]


def _main(argv: list[str]) -> tuple[int, str]:
    """The exit code and stderr of `python -m runtime.evaluate argv`, run in this process."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's errors exit
            code = e.code
    return code, stderr.getvalue()


def _models(root: Path, argv: list[str]) -> tuple[int, str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        return _main(argv)


def _cells(table: str, metric: str) -> list[str]:
    [line] = [line for line in table.splitlines() if line.startswith(f"| {metric} |")]
    return line.removeprefix("| ").removesuffix(" |").split(" | ")[2:]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder holding cpt/export, sft/export and dpo/export (seeds 0, 1, 2) and a domain text."""
    root = tmp_path_factory.mktemp("chain")
    for seed, export in enumerate(EXPORTS):
        build_tiny_llama(root / export, seed=seed)
    (root / "domain.txt").write_text(TEXT)
    return root


@pytest.fixture(scope="module")
def chain(root):
    """One command scoring the three exports, named by their paths as given: its exit code, stderr,
    results.json, comparison.md, and the most models that were loaded at once."""
    loaded: weakref.WeakSet[HFModel] = weakref.WeakSet()
    peak = 0

    class CountedModel(HFModel):
        def __init__(self, *args, **kwargs):
            nonlocal peak
            super().__init__(*args, **kwargs)
            loaded.add(self)
            peak = max(peak, len(loaded))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "HFModel", CountedModel)
        argv = [arg for export in EXPORTS for arg in ("--model", export)]
        code, stderr = _models(root, [*argv, *BENCHMARKS, *SMALL, *PERPLEXITY, "--out", "out"])
    results = json.loads((root / "out" / "results.json").read_text())
    return code, stderr, results, (root / "out" / "comparison.md").read_text(), peak


def test_three_models_are_scored_in_the_order_given_one_in_memory_at_a_time(chain, root):
    code, stderr, results, _, peak = chain
    assert code == 0 and peak == 1
    assert results["model_order"] == EXPORTS and results["baseline"] == "cpt/export"
    paths = [str((root / export).resolve()) for export in EXPORTS]
    assert [line for line in stderr.splitlines() if line.startswith("model ")] == [
        f"model {number}/3 ({export}): loading {path}"
        for number, (export, path) in enumerate(zip(EXPORTS, paths, strict=True), start=1)
    ]
    models = [results["models"][export] for export in EXPORTS]
    assert [model["path"] for model in models] == paths
    assert len({model["revision"] for model in models}) == 3
    for name in BENCHMARK_FILES:
        scores = [model["benchmarks"][name] for model in models]
        assert {(s["n"], s["mode"], s["k_shot"], s["prompt_sha256"]) for s in scores} == {
            (2, "loglik", 1, scores[0]["prompt_sha256"])
        }
    assert {model["perplexity"]["domain"]["tokens"] for model in models} == {189}


def test_comparison_has_three_value_columns_and_each_later_models_change_from_the_first(chain):
    _, _, results, table, _ = chain
    lines = table.splitlines()
    assert lines[0] == "| metric | detail | cpt/export | sft/export | dpo/export | change: sft/export | change: dpo/export |"
    assert len(lines) == 2 + len(BENCHMARK_FILES) + 1  # header, rule, an accuracy per benchmark, the perplexity
    models = [results["models"][export] for export in EXPORTS]
    for name in BENCHMARK_FILES:
        accuracy = [100 * model["benchmarks"][name]["accuracy"] for model in models]
        cells = _cells(table, f"{name} accuracy (%)")
        assert [cell.split(" [")[0] for cell in cells[:3]] == [f"{a:.2f}" for a in accuracy]
        assert cells[3:] == [f"{a - accuracy[0]:+.2f} pts" for a in accuracy[1:]]
    ppl = [model["perplexity"]["domain"]["perplexity"] for model in models]
    assert len(set(ppl)) == 3  # the change from the first differs from the change from the one before
    assert _cells(table, "domain text perplexity") == [f"{p:.3f}" for p in ppl] + [
        f"{p - ppl[0]:+.3f} ({100 * (p - ppl[0]) / ppl[0]:+.1f}%)" for p in ppl[1:]
    ]


def test_name_equals_dir_heads_the_columns_and_compare_to_is_scored_first_as_the_base(root):
    argv = ["--compare-to", "cpt/export", "--model", "sft=sft/export", "--model", "dpo=dpo/export"]
    code, stderr = _models(root, [*argv, *ONE_QUESTION, "--out", "named"])
    assert code == 0, stderr
    results = json.loads((root / "named" / "results.json").read_text())
    assert results["model_order"] == ["cpt/export", "sft", "dpo"] and results["baseline"] == "cpt/export"
    assert results["models"]["sft"]["path"] == str((root / "sft" / "export").resolve())
    header = (root / "named" / "comparison.md").read_text().splitlines()[0]
    assert header == "| metric | detail | cpt/export | sft | dpo | change: sft | change: dpo |"


def test_no_baseline_drops_the_change_columns(root):
    argv = ["--model", "a=cpt/export", "--model", "b=sft/export", "--no-baseline"]
    code, stderr = _models(root, [*argv, *ONE_QUESTION, "--out", "side-by-side"])
    assert code == 0, stderr
    results = json.loads((root / "side-by-side" / "results.json").read_text())
    assert results["model_order"] == ["a", "b"] and results["baseline"] is None
    assert (root / "side-by-side" / "comparison.md").read_text().splitlines()[0] == "| metric | detail | a | b |"


def test_one_model_and_compare_to_keep_the_model_and_compare_to_keys(root):
    code, stderr = _models(root, ["--model", "sft/export", "--compare-to", "cpt/export", *ONE_QUESTION, "--out", "two"])
    assert code == 0, stderr
    results = json.loads((root / "two" / "results.json").read_text())
    assert (results["model_order"], results["baseline"]) == (["compare_to", "model"], "compare_to")
    assert results["models"]["compare_to"]["path"] == str((root / "cpt" / "export").resolve())
    header = (root / "two" / "comparison.md").read_text().splitlines()[0]
    assert header == "| metric | detail | base: export | model: export | change |"


PROG = "python -m runtime.evaluate"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "cpt/export", "--model", "nope"], "nope: model directory not found"),
        (["--model", "nope"], "nope: model directory not found"),
        (["--model", "cpt/export", "--model", "domain.txt"], "domain.txt: is a file, not a model directory"),
        (
            ["--model", "cpt/export", "--model", "empty"],
            ("empty: no config.json: not a Hugging Face model directory (a LoRA export holding only adapters needs "
             "checkpoint.merge_lora: true)"),
        ),
        (
            ["--model", "cpt/export", "--model", "lora/export"],
            ("lora/export: holds only LoRA adapters (adapter/adapter_config.json, no config.json): set "
             "checkpoint.merge_lora: true in the recipe that trained it, so that its export holds the full model"),
        ),
        (
            ["--model", "x=cpt/export", "--model", "x=sft/export"],
            "two models are named 'x' (cpt/export and sft/export): name the columns apart with --model NAME=DIR",
        ),
        (
            ["--compare-to", "cpt/export", "--model", "cpt/export", "--model", "sft/export"],
            ("two models are named 'cpt/export' (cpt/export and cpt/export): name the columns apart with "
             "--model NAME=DIR"),
        ),
        (
            ["--model", "=cpt/export"],
            f"{PROG}: argument --model: expected DIR or NAME=DIR, got '=cpt/export' (see --help)",
        ),
        (
            ["--model", "sft/export", "--compare-to", "cpt/export", "--no-baseline"],
            f"{PROG}: --no-baseline contradicts --compare-to, which names the base: drop one (see --help)",
        ),
    ],
    ids=["missing", "missing-single", "file", "no-config", "adapters-only", "name-twice", "compare-to-twice",
         "empty-name", "no-baseline-and-compare-to"],
)
def test_a_bad_model_is_one_line_and_exit_2_before_any_model_loads(root, argv, message, monkeypatch):
    (root / "empty").mkdir(exist_ok=True)
    (root / "lora" / "export" / "adapter").mkdir(parents=True, exist_ok=True)
    (root / "lora" / "export" / "adapter" / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(run_module, "HFModel", None)  # loading any model would raise TypeError
    code, stderr = _models(root, [*argv, *ONE_QUESTION, "--out", "refused"])
    assert (code, stderr) == (2, f"error: {message}\n")
    assert not (root / "refused").exists()
