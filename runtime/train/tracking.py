"""Experiment tracking: rank 0 sends each metrics.jsonl record to TensorBoard, W&B and MLflow, as the plan says.

`MetricsLog` hands every record it writes to a `Tracker`, which opens the plan's backends (`runtime.tracking`)
at the `start` record and turns `step` and `memory` records into scalars named as in `STEP_SCALARS` and
`MEMORY_SCALARS`, `start` into the run's parameters, and `stopped`/`end` into its final status. A backend is
imported only when the plan turns it on. `check_installed` runs on every rank before any collective, so a
missing package fails every rank alike, in one line naming the pip package.

W&B and MLflow keep one run per training (`run_id`): a resumed run appends to it. TensorBoard starts a new event
file in the same folder with `purge_step`, so steps that ran twice (before a kill and after the resume) show
their later values, as in metrics.jsonl.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from dapc.errors import DapcError

from .config import TrainPlan

__all__ = ["MEMORY_SCALARS", "PLAN_MEMORY_SCALAR", "STEP_SCALARS", "Tracker", "TrackingError", "check_installed",
           "run_id", "run_params"]

# metrics.jsonl field → tracked scalar name, per record type.
STEP_SCALARS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens": "train/tokens",
    "tokens_per_second": "train/tokens_per_second", "step_seconds": "train/step_seconds", "mfu": "train/mfu",
    "peak_memory_bytes": "memory/peak_bytes",
}
MEMORY_SCALARS = {"measured_bytes": "memory/measured_bytes", "estimated_bytes": "memory/estimated_bytes",
                  "ratio": "memory/measured_over_estimate"}
PLAN_MEMORY_SCALAR = "memory/plan_total_bytes"  # logged with every step, beside memory/peak_bytes

# backend → (module it imports, pip package that provides it)
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
             "mlflow": ("mlflow", "mlflow-skinny")}
_MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


class TrackingError(DapcError):
    """A tracking backend the plan turns on that cannot run here (its package is not installed)."""


def check_installed(plan: TrainPlan) -> None:
    """Raises TrackingError (located at the plan) for the first backend the plan turns on whose package is
    missing. Looks the modules up without importing them."""
    for backend in _enabled(plan):
        module, package = _PACKAGES[backend]
        if importlib.util.find_spec(module) is None:
            raise TrackingError(f"runtime.tracking.{backend} is on (recipe logging.{backend}), but the {module} "
                                f"package is not installed: pip install {package}, or turn it off in the recipe",
                                plan.path)


def run_id(plan: TrainPlan) -> str:
    """Returns the W&B run id and MLflow `dapc.run_id` tag of this training: 16 hex digits of the sha256 of its
    trajectory and output folder, the same for every resume (even on another world size)."""
    digest = hashlib.sha256(f"{plan.trajectory_sha256}\n{plan.output_dir}".encode()).hexdigest()
    return digest[:16]


def run_params(plan: TrainPlan) -> dict[str, str | int | float]:
    """Returns the plan's facts a tracked run is filed under: hashes, strategy, batch, schedule, planned step
    time (seconds) and memory (bytes per GPU)."""
    return {
        "plan_sha256": plan.plan_sha256, "trajectory_sha256": plan.trajectory_sha256, "model": plan.model_source,
        "method": plan.method, "strategy": plan.strategy, "backend": plan.backend, "world_size": plan.world_size,
        "seq_len": plan.seq_len, "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
        "global_batch_sequences": plan.global_batch_sequences, "steps": plan.steps, "lr": plan.lr,
        "schedule": plan.schedule, "precision": plan.precision, "seed": plan.seed,
        "planned_step_seconds": plan.planned_step_seconds, "plan_memory_total_bytes": plan.memory_total_bytes,
        "memory_counter": plan.memory_counter,
    }


class _Sink(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def close(self, status: str) -> None: ...


class Tracker:
    """Fans metrics.jsonl records out to the plan's backends (rank 0 only). A backend that fails is dropped with
    one warning line: tracking never stops a training, and metrics.jsonl keeps every record."""

    def __init__(self, plan: TrainPlan):
        self.plan = plan
        self._sinks: dict[str, _Sink] = {}
        self._last_step = 0
        self._status = "failed"  # until an `end` record says otherwise

    def record(self, event: str, fields: dict[str, Any]) -> None:
        """Passes one record on: `start` opens the backends, `step` and `memory` become scalars."""
        if event == "start":
            self._last_step = fields["step"]
            self._open(fields["step"])
        elif event == "step":
            self._last_step = fields["step"]
            values = {name: fields[key] for key, name in STEP_SCALARS.items() if key in fields}
            self._send(fields["step"], {**values, PLAN_MEMORY_SCALAR: self.plan.memory_total_bytes})
        elif event == "memory":
            self._send(self._last_step, {name: fields[key] for key, name in MEMORY_SCALARS.items()})
        elif event == "stopped":
            self._status = "stopped"
        elif event == "end" and self._status != "stopped":
            self._status = "finished"

    def evaluation(self, step: int, values: dict[str, float]) -> None:
        """Logs evaluation scalars (`eval_scalars`) at optimizer step `step` into the training's own runs,
        which it reopens without hiding any of their steps, then closes them as finished."""
        self._status = "finished"
        self._open(0)
        self._send(step, values)
        self.close()

    def close(self) -> None:
        """Closes every backend with the run's status: finished, stopped (a preemption) or failed."""
        for name, sink in list(self._sinks.items()):
            self._guard(name, lambda: sink.close(self._status))
        self._sinks.clear()

    def _open(self, start_step: int) -> None:
        openers = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}
        for backend in _enabled(self.plan):
            if backend not in self._sinks:
                sink = self._guard(backend, lambda: openers[backend](self.plan, start_step))
                if sink is not None:
                    self._sinks[backend] = sink

    def _send(self, step: int, values: dict[str, float]) -> None:
        for name, sink in list(self._sinks.items()):
            self._guard(name, lambda: sink.scalars(step, values))

    def _guard(self, name: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except Exception as e:  # noqa: BLE001 — any backend failure, so that training goes on
            self._sinks.pop(name, None)
            print(f"warning: tracking: {name} failed and is off for the rest of this run "
                  f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); metrics.jsonl has every record",
                  file=sys.stderr, flush=True)
            return None


def eval_scalars(results: dict[str, Any]) -> dict[str, float]:
    """Returns an evaluation's numbers as tracker scalars: `eval/<model>/<benchmark>/accuracy` (and the
    official accuracy where the benchmark has one) and `eval/<model>/perplexity/<text>`, for each model of
    results.json (`model` is the adapted one, `compare_to` its base)."""
    values: dict[str, float] = {}
    for key, model in results["models"].items():
        for name, score in model.get("benchmarks", {}).items():
            values[f"eval/{key}/{name}/accuracy"] = score["accuracy"]
            if score.get("official_accuracy") is not None:
                values[f"eval/{key}/{name}/official_accuracy"] = score["official_accuracy"]
        for name, ppl in model.get("perplexity", {}).items():
            if ppl.get("perplexity") is not None:
                values[f"eval/{key}/perplexity/{name}"] = ppl["perplexity"]
    return values


def _enabled(plan: TrainPlan) -> list[str]:
    t = plan.tracking
    return [name for name, on in (("tensorboard", t.tensorboard), ("wandb", t.wandb), ("mlflow", t.mlflow)) if on]


class _TensorBoard:
    def __init__(self, plan: TrainPlan, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run hides what the earlier files logged from its first step on: the later record wins.
        self.writer = SummaryWriter(plan.tracking.tensorboard.log_dir, purge_step=start_step + 1 if start_step else None,
                                    flush_secs=30)
        rows = "\n".join(f"| {key} | {value} |" for key, value in run_params(plan).items())
        self.writer.add_text("plan", f"| plan | |\n|---|---|\n{rows}", global_step=start_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self, status: str) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, plan: TrainPlan, start_step: int):
        import wandb

        w = plan.tracking.wandb
        Path(w.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=w.project, entity=w.entity, dir=w.dir, mode=w.mode, name=plan.tracking.run_name,
            id=run_id(plan), resume="allow", config=run_params(plan),
            settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=1 if status == "failed" else 0)


class _Mlflow:
    def __init__(self, plan: TrainPlan, start_step: int):
        m = plan.tracking.mlflow
        if m.tracking_uri.startswith("file:"):
            # MLflow 3 keeps its file store only behind this switch; the plan asked for one.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=m.tracking_uri)
        found = self.client.get_experiment_by_name(m.experiment)
        experiment = found.experiment_id if found else self.client.create_experiment(m.experiment)
        key = run_id(plan)
        runs = self.client.search_runs([experiment], filter_string=f"tags.`dapc.run_id` = '{key}'", max_results=1)
        if runs:
            self.run_id = runs[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            if start_step:  # not when the evaluation reopens the run
                self.client.set_tag(self.run_id, "dapc.resumed_at_step", str(start_step))
        else:
            run = self.client.create_run(experiment, run_name=plan.tracking.run_name,
                                         tags={"dapc.run_id": key, "dapc.plan_sha256": plan.plan_sha256})
            self.run_id = run.info.run_id
            # Parameters only on the run's first start: MLflow refuses to change one (another world size).
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in run_params(plan).items()])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now_ms, step) for k, v in values.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=_MLFLOW_STATUS[status])
