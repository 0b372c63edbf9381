"""Experiment tracking: the plan resolves `logging:`, and rank 0 sends metrics.jsonl's records to TensorBoard, W&B
(offline) and MLflow (a file store), each read back with its own reader."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.train import tracking
from runtime.train.config import load_plan
from runtime.train.tracking import (
    MEMORY_SCALARS,
    PLAN_MEMORY_SCALAR,
    STEP_SCALARS,
    Tracker,
    TrackingError,
    check_installed,
    run_id,
)
from tests.conftest import REPO
from tests.run_support import TINY_STEPS, tiny_run, wandb_history, wandb_records  # noqa: F401 (fixture)

TINY_RECIPE = REPO / "examples" / "tiny" / "recipe.yaml"


def _expected(run) -> dict[int, dict[str, float]]:
    """The scalars each step should carry, from metrics.jsonl (the memory record lands on the last step)."""
    plan = run.plan
    rows = {r["step"]: {**{name: r[key] for key, name in STEP_SCALARS.items()},
                        PLAN_MEMORY_SCALAR: plan["memory"]["per_gpu_bytes"]["total"]} for r in run.records("step")}
    (memory,) = run.records("memory")
    rows[TINY_STEPS].update({name: memory[key] for key, name in MEMORY_SCALARS.items()})
    return rows


def _mlflow_client(uri: str):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_tensorboard_event_files_hold_the_values_of_metrics_jsonl(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tiny_run.plan["runtime"]["tracking"]["tensorboard"]["log_dir"])
    events.Reload()
    found: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            found.setdefault(event.step, {})[tag] = event.value
    expected = _expected(tiny_run)
    assert sorted(found) == list(range(1, TINY_STEPS + 1))
    # TensorBoard stores scalars as float32: equal once metrics.jsonl's values are too.
    assert found == {step: {k: float(np.float32(v)) for k, v in row.items()} for step, row in expected.items()}
    assert "plan/text_summary" in events.Tags()["tensors"]  # the plan's facts, as a text table


def test_wandb_offline_run_holds_the_history_and_the_plan(tiny_run):
    plan = tiny_run.plan
    wandb_dir = Path(plan["runtime"]["tracking"]["wandb"]["dir"]) / "wandb"
    (run_file,) = wandb_dir.glob("offline-run-*/run-*.wandb")
    key = run_id(load_plan(tiny_run.plan_path))
    assert run_file.name == f"run-{key}.wandb"
    assert wandb_history(run_file) == _expected(tiny_run)  # W&B keeps JSON doubles: exact
    (run_record,) = [r.run for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
    assert (run_record.run_id, run_record.project, run_record.display_name) == (key, "tiny-cpu", "tiny-cpu")
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert (config["plan_sha256"], config["world_size"]) == (plan["plan_sha256"], 1)


def test_mlflow_file_store_run_holds_the_metrics_params_and_status(tiny_run):
    plan = tiny_run.plan
    uri = plan["runtime"]["tracking"]["mlflow"]["tracking_uri"]
    assert uri == (tiny_run.run_dir / "mlruns").as_uri()
    client = _mlflow_client(uri)
    experiment = client.get_experiment_by_name("tiny-cpu")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-cpu"
    assert run.data.tags["dapc.run_id"] == run_id(load_plan(tiny_run.plan_path))
    assert (run.data.params["plan_sha256"], run.data.params["strategy"]) == (plan["plan_sha256"], "ddp")
    found: dict[int, dict[str, float]] = {}
    for name in run.data.metrics:
        for metric in client.get_metric_history(run.info.run_id, name):
            found.setdefault(metric.step, {})[name] = metric.value
    assert found == _expected(tiny_run)


def test_a_resumed_run_continues_each_tracker_and_the_later_records_win(tmp_path):
    from dapc.compile import compile_recipe
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    compiled = compile_recipe(TINY_RECIPE, ("logging.wandb.enabled=true", "logging.mlflow.enabled=true"),
                              output=str(tmp_path / "run")).plan
    (tmp_path / "plan.json").write_text(compiled.text())
    plan = load_plan(tmp_path / "plan.json")

    def launch(start: int, last: int, loss_of) -> None:
        tracker = Tracker(plan)
        tracker.record("start", {"step": start})
        for step in range(start + 1, last + 1):
            tracker.record("step", {"step": step, "loss": loss_of(step), "lr": 1e-3})
        if last == plan.steps:
            tracker.record("end", {})
        tracker.close()

    launch(0, 6, lambda step: 10.0 + step)  # killed after step 6, with a checkpoint after step 4
    time.sleep(1.1)  # W&B names an offline segment's folder by the second it starts in
    launch(4, plan.steps, lambda step: 20.0 + step)  # resumed from step 4
    later = {step: (10.0 + step if step <= 4 else 20.0 + step) for step in range(1, plan.steps + 1)}

    events = EventAccumulator(plan.tracking.tensorboard.log_dir)
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == later
    client = _mlflow_client(plan.tracking.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-cpu").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["dapc.resumed_at_step"] == "4"
    # MLflow appends: steps 5 and 6 appear twice, the resumed launch's values last.
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert history == [(s, 10.0 + s) for s in range(1, 7)] + [(s, 20.0 + s) for s in range(5, plan.steps + 1)]
    segments = sorted(Path(plan.tracking.wandb.dir, "wandb").glob("offline-run-*/run-*.wandb"))
    assert [p.name for p in segments] == [f"run-{run_id(plan)}.wandb"] * 2  # one W&B run, in two offline segments
    assert [sorted(wandb_history(p)) for p in segments] == [list(range(1, 7)), list(range(5, plan.steps + 1))]


def test_evaluation_scores_join_the_trained_runs_at_the_last_step(tmp_path):
    from dapc.compile import compile_recipe
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    compiled = compile_recipe(TINY_RECIPE, ("logging.mlflow.enabled=true",), output=str(tmp_path / "run")).plan
    (tmp_path / "plan.json").write_text(compiled.text())
    plan = load_plan(tmp_path / "plan.json")
    tracker = Tracker(plan)
    tracker.record("start", {"step": 0})
    for step in range(1, plan.steps + 1):
        tracker.record("step", {"step": step, "loss": 10.0 - step, "lr": 1e-3})
    tracker.record("end", {})
    tracker.close()
    results = {"models": {
        "model": {"benchmarks": {"cti-mcq": {"accuracy": 0.5, "official_accuracy": 0.625}},
                  "perplexity": {"general": {"perplexity": 12.5}}},
        "compare_to": {"benchmarks": {"cti-mcq": {"accuracy": 0.25, "official_accuracy": None}}, "perplexity": {}}}}
    values = tracking.eval_scalars(results)
    assert values == {"eval/model/cti-mcq/accuracy": 0.5, "eval/model/cti-mcq/official_accuracy": 0.625,
                      "eval/model/perplexity/general": 12.5, "eval/compare_to/cti-mcq/accuracy": 0.25}
    Tracker(plan).evaluation(plan.steps, values)

    events = EventAccumulator(plan.tracking.tensorboard.log_dir)
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == {s: 10.0 - s for s in range(1, plan.steps + 1)}
    assert [(e.step, e.value) for e in events.Scalars("eval/model/cti-mcq/accuracy")] == [(plan.steps, 0.5)]
    client = _mlflow_client(plan.tracking.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-cpu").experiment_id])
    assert run.info.status == "FINISHED" and "dapc.resumed_at_step" not in run.data.tags
    assert run.data.metrics["eval/model/perplexity/general"] == 12.5


def test_tracking_defaults_and_paths_resolve_into_the_plan(tmp_path):
    from dapc.compile import compile_recipe

    out = tmp_path / "run"
    default = compile_recipe(TINY_RECIPE, output=str(out)).plan.runtime.tracking
    assert default.model_dump() == {"run_name": "tiny-cpu", "tensorboard": {"log_dir": str(out / "tensorboard")},
                                    "wandb": None, "mlflow": None}
    overrides = ("logging.tensorboard.enabled=false", "logging.wandb.enabled=true", "logging.wandb.project=cyber",
                 "logging.wandb.dir=../tracking", "logging.mlflow.enabled=true",
                 "logging.mlflow.tracking_uri=file:store", "logging.mlflow.experiment=dapt")
    plan = compile_recipe(TINY_RECIPE, overrides, output=str(out)).plan
    assert plan.runtime.tracking.model_dump() == {
        "run_name": "tiny-cpu", "tensorboard": None,
        "wandb": {"mode": "offline", "project": "cyber", "entity": None, "dir": str(tmp_path / "tracking")},
        "mlflow": {"tracking_uri": (out / "store").as_uri(), "experiment": "dapt"}}
    assert plan.warnings == ()


def test_wandb_online_without_credentials_is_a_plan_warning(tmp_path):
    from dapc.compile import compile_recipe

    plan = compile_recipe(TINY_RECIPE, ("logging.wandb.enabled=true", "logging.wandb.mode=online"),
                          output=str(tmp_path / "run")).plan
    assert plan.warnings == ("logging.wandb.mode online: the training processes need W&B credentials; add "
                             "WANDB_API_KEY to launch.passthrough_env, or run `wandb login` on every node",)
    passed = compile_recipe(TINY_RECIPE, ("logging.wandb.enabled=true", "logging.wandb.mode=online",
                                          'launch.passthrough_env=["WANDB_API_KEY"]'), output=str(tmp_path / "run")).plan
    assert passed.warnings == ()


@pytest.mark.parametrize(("override", "message"), [
    ("logging.wandb.project=team/run", "logging.wandb.project: value error, a W&B name has 1 to 128 characters, none "
     "of / \\ # ? % : or a control character, and does not start with a space (got 'team/run')"),
    ("logging.mlflow.tracking_uri=mlruns", "logging.mlflow.tracking_uri: value error, not a tracking URI: give one "
     "with its scheme (file:/path/mlruns, file:mlruns relative to output, http://host:5000, databricks) (got 'mlruns')"),
    ("logging.wandb.mode=cloud", "logging.wandb.mode: input should be 'offline' or 'online' (got 'cloud')"),
], ids=["wandb-project", "mlflow-uri", "wandb-mode"])
def test_impossible_tracking_settings_are_refused_at_plan_time(override: str, message: str):
    from dapc.compile import compile_recipe
    from dapc.errors import DapcError

    with pytest.raises(DapcError) as raised:
        compile_recipe(TINY_RECIPE, (override,))
    assert str(raised.value) == f"--set {override}: {message}"


def test_a_missing_tracking_package_is_one_line_naming_the_pip_package(tmp_path, monkeypatch):
    from dapc.compile import compile_recipe

    (tmp_path / "plan.json").write_text(compile_recipe(TINY_RECIPE, ("logging.mlflow.enabled=true",),
                                                       output=str(tmp_path / "run")).plan.text())
    plan = load_plan(tmp_path / "plan.json")
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(TrackingError) as raised:
        check_installed(plan)
    assert str(raised.value) == (f"{tmp_path / 'plan.json'}: runtime.tracking.mlflow is on (recipe logging.mlflow), "
                                 "but the mlflow package is not installed: pip install mlflow-skinny, or turn it off "
                                 "in the recipe")


def test_a_failing_tracker_is_dropped_with_one_warning_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    from dapc.compile import compile_recipe

    (tmp_path / "plan.json").write_text(compile_recipe(TINY_RECIPE, ("logging.mlflow.enabled=true",),
                                                       output=str(tmp_path / "run")).plan.text())
    plan = load_plan(tmp_path / "plan.json")

    class Broken:
        def __init__(self, plan, start_step):
            pass

        def scalars(self, step, values):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracking, "_TensorBoard", Broken)
    tracker = Tracker(plan)
    tracker.record("start", {"step": 0})
    for step in (1, 2):
        tracker.record("step", {"step": step, "loss": 1.0 / step})
    tracker.record("end", {})
    tracker.close()
    assert capsys.readouterr().err.splitlines() == [
        "warning: tracking: tensorboard failed and is off for the rest of this run (OSError: [Errno 28] No space "
        "left on device); metrics.jsonl has every record"]
    client = _mlflow_client(plan.tracking.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-cpu").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(1, 1.0), (2, 0.5)]
