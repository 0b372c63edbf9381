"""One tiny real training run, shared by tests/test_tracking.py and tests/test_run_report.py (no tests here).

The tiny example on one process (DDP), 4 optimizer steps, a checkpoint every 2, with TensorBoard, W&B
(offline) and MLflow (file store) all on. plan.json sits in the run directory, where `dapc render` puts it.
The run is made once per test session: the `tiny_run` fixture of either module returns the same run.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.train_support import compile_plan, train

TINY_STEPS = 4
_OVERRIDES = ("strategy=ddp", "hardware.gpus_per_node=1", f"training.tokens={TINY_STEPS * 8 * 128}",
              "checkpoint.every_steps=2", "checkpoint.export_hf=false", "logging.wandb.enabled=true",
              "logging.mlflow.enabled=true")
_made: dict[str, TinyRun] = {}


@dataclass(frozen=True)
class TinyRun:
    run_dir: Path
    plan_path: Path

    @property
    def plan(self) -> dict:
        return json.loads(self.plan_path.read_text())

    @property
    def metrics_path(self) -> Path:
        return Path(self.plan["paths"]["metrics_path"])

    def records(self, event: str | None = None) -> list[dict]:
        lines = self.metrics_path.read_text().splitlines()
        return [r for r in map(json.loads, lines) if event is None or r["event"] == event]


@pytest.fixture(scope="session")
def tiny_run(prepared_dir: Path, tmp_path_factory) -> TinyRun:
    """The finished tiny run (trained on first use in the session)."""
    if "run" not in _made:
        folder = tmp_path_factory.mktemp("tiny-run")
        (folder / "run").mkdir()
        plan_path = compile_plan(folder, prepared_dir, *_OVERRIDES, name="run/plan.json")
        train(plan_path, nproc=1)
        _made["run"] = TinyRun(folder / "run", plan_path)
    return _made["run"]


def wandb_records(path: Path) -> list:
    """Returns the records of a W&B `.wandb` file as `wandb_internal_pb2.Record`s. W&B ships no reader for it; the
    format is LevelDB's log (32 KiB blocks of [crc32, length, type] chunks) after a 7-byte ':W&B' header."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, position, payload, found = 32768, 7, b"", []
    while position + 7 <= len(data):
        left_in_block = block - position % block
        if left_in_block < 7:  # a block's tail too short for a chunk header is padding
            position += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", data, position + 4)
        payload += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            found.append(record)
            payload = b""
    return found


def wandb_history(path: Path) -> dict[int, dict[str, float]]:
    """Returns the scalars a W&B offline run logged, by step."""
    rows = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[values.pop("_step")] = {k: v for k, v in values.items() if not k.startswith("_")}
    return rows
