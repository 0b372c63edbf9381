"""Helpers for the trainer tests (no tests here): compile the tiny example, prepare once, launch torchrun.

Every run uses the tiny example (5M-parameter Llama, random init) on `../shared/data/corpus`, one prepared
data directory per test session, gloo on the CPU, and a 120 s collective timeout so a hang fails fast.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED

CORPUS = SHARED / "data" / "corpus"
TINY_RECIPE = REPO / "examples" / "tiny" / "recipe.yaml"
RUN_TIMEOUT_SECONDS = 300


def run_env(plan_path: Path | None = None) -> dict[str, str]:
    """The environment the rendered launch script gives the trainer: the plan's `runtime.env`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DAPC_DIST_TIMEOUT_SECONDS": "120", "PYTHONUNBUFFERED": "1"}
    if plan_path is not None:
        env.update(read_plan(plan_path)["runtime"]["env"])
    return env


def compile_plan(folder: Path, prepared_dir: Path, *overrides: str, name: str = "plan.json") -> Path:
    """Compiles the tiny example with `overrides` into `folder/<name>` (output `folder/run`)."""
    from dapc.compile import compile_recipe

    folder.mkdir(parents=True, exist_ok=True)
    compiled = compile_recipe(
        TINY_RECIPE,
        overrides=(f"data.paths={json.dumps([str(CORPUS)])}", f"data.prepared_dir={prepared_dir}", *overrides),
        output=str(folder / "run"),
    )
    path = folder / name
    path.write_text(compiled.plan.text())
    return path


def read_plan(plan_path: Path) -> dict:
    return json.loads(plan_path.read_text())


def launch_command(plan_path: Path, nproc: int) -> list[str]:
    """What the rendered launch script runs: torchrun with a c10d rendezvous (here on a free local port)."""
    if nproc == 1:
        return [sys.executable, "-m", "runtime.train", "--plan", str(plan_path)]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
            "-m", "runtime.train", "--plan", str(plan_path)]


def train(plan_path: Path, nproc: int) -> subprocess.CompletedProcess:
    """Runs the trainer to completion; fails the test with its output when it does not exit 0."""
    done = subprocess.run(launch_command(plan_path, nproc), cwd=REPO, env=run_env(plan_path), capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_SECONDS, check=False)
    if done.returncode != 0:
        pytest.fail(f"trainer exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def kill_tree(pid: int) -> None:
    """kill -9s process `pid` and every process below it, and waits until they are gone. Not killpg alone:
    torchrun starts each rank in a session of its own (torch.distributed.elastic's SubprocessHandler), so
    killing its group leaves the ranks training, and writing checkpoints, beside the relaunched run."""
    import psutil

    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in family:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def train_killed_once(plan_path: Path, nproc: int, marker: Path, log_path: Path) -> None:
    """Launches the trainer and kill -9s it (torchrun and every rank: `kill_tree`) as soon as `marker`
    exists, e.g. a checkpoint's meta.json; fails the test if the trainer exits first or `marker` never comes."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(launch_command(plan_path, nproc), cwd=REPO, env=run_env(plan_path), stdout=log,
                                stderr=log, start_new_session=True)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
            while not marker.exists():
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, f"no {marker} in time"
                time.sleep(0.05)
        finally:
            kill_tree(proc.pid)
            proc.wait()


def records(plan_path: Path, event: str | None = None) -> list[dict]:
    lines = Path(read_plan(plan_path)["paths"]["metrics_path"]).read_text().splitlines()
    found = [json.loads(line) for line in lines]
    return [r for r in found if event is None or r["event"] == event]


def losses(plan_path: Path) -> dict[int, float]:
    """Loss per step; where a step ran twice (killed, then resumed) the later record counts."""
    return {r["step"]: r["loss"] for r in records(plan_path, "step")}


def generate_from_export(export_dir: Path) -> str:
    """Loads an exported folder with AutoModelForCausalLM and greedily generates 8 tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(export_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    prompt = tokenizer("Zero trust architecture", return_tensors="pt").input_ids
    output = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert output.shape[1] == prompt.shape[1] + 8
    return tokenizer.decode(output[0, prompt.shape[1]:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> Path:
    """The tiny example's corpus prepared once (seq_len 128, the mistral-common tokenizer) for all runs."""
    if not CORPUS.is_dir():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    root = tmp_path_factory.mktemp("train-data")
    data = root / "data"
    plan_path = compile_plan(root / "prepare", data)
    subprocess.run([sys.executable, "-m", "runtime.prepare", "--plan", str(plan_path), "--no-progress"], cwd=REPO,
                   env=run_env(), check=True, capture_output=True, timeout=RUN_TIMEOUT_SECONDS)
    return data


def rehash(plan: dict) -> dict:
    """Returns `plan` (a plan.json dict a test edited) with its `plan_sha256` recomputed, as if dapc wrote it."""
    from dapc.plan_schema import sha256_of

    body = {k: v for k, v in plan.items() if k not in ("provenance", "plan_sha256")}
    return {**plan, "plan_sha256": sha256_of(body)}
