"""Crash safety and refusal: kill -9 mid-run then relaunch; a checkpoint of another plan; a bad plan.

About a minute on 2 cores (2-process FSDP2 runs of the tiny example).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.checkpoint import complete_checkpoints
from tests.conftest import REPO
from tests.test_train_support import (  # noqa: F401  (prepared_dir is a fixture)
    compile_plan,
    launch_command,
    losses,
    prepared_dir,
    read_plan,
    records,
    run_env,
    train,
)

KILL_AFTER_STEP = 4


def test_kill_9_after_a_checkpoint_then_relaunch_matches_an_uninterrupted_run(prepared_dir: Path, tmp_path: Path):
    reference = compile_plan(tmp_path / "reference", prepared_dir, "checkpoint.export_hf=false")
    train(reference, nproc=2)
    expected = losses(reference)

    plan_path = compile_plan(tmp_path / "killed", prepared_dir, "checkpoint.export_hf=false")
    checkpoints = Path(read_plan(plan_path)["paths"]["checkpoint_dir"])
    with open(tmp_path / "killed.log", "w") as log:
        launch = subprocess.Popen(launch_command(plan_path, 2), cwd=REPO, env=run_env(plan_path), stdout=log,
                                  stderr=log, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not (checkpoints / f"step-{KILL_AFTER_STEP}" / "meta.json").exists():
                assert launch.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 240 s"
                time.sleep(0.05)
        finally:
            os.killpg(launch.pid, signal.SIGKILL)  # torchrun and both ranks, mid-step
            launch.wait()
    killed_at = max(losses(plan_path))
    assert killed_at < 12, "the run finished before it was killed"
    assert 4 <= complete_checkpoints(checkpoints)[-1][0] < 12

    train(plan_path, nproc=2)
    resumed = records(plan_path, "start")[-1]
    resumed_step = resumed["step"]
    assert Path(resumed["resumed_from"]).name == f"step-{resumed_step}" and resumed_step >= KILL_AFTER_STEP
    after = losses(plan_path)
    assert sorted(after) == list(range(1, 13))
    for step in range(resumed_step + 1, 13):
        assert after[step] == pytest.approx(expected[step], rel=1e-6), (step, after[step], expected[step])


def test_checkpoint_of_another_plan_is_refused_naming_the_file_and_both_hashes(prepared_dir: Path, tmp_path: Path):
    short = ("checkpoint.export_hf=false", "training.tokens=4096", "checkpoint.every_steps=2")  # 4 steps
    first = compile_plan(tmp_path, prepared_dir, *short)
    train(first, nproc=2)
    other = compile_plan(tmp_path, prepared_dir, *short, "training.lr=5e-4", name="other.json")  # same output dir
    done = subprocess.run([sys.executable, "-m", "runtime.train", "--plan", str(other)], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    meta = Path(read_plan(first)["paths"]["checkpoint_dir"]) / "step-4" / "meta.json"
    assert done.returncode == 2
    assert done.stderr == (
        f"error: {meta}: checkpoint was written under plan_sha256 {read_plan(first)['plan_sha256']}, but {other} has "
        f"plan_sha256 {read_plan(other)['plan_sha256']}; resume with the plan that wrote it, or give this plan "
        "another output directory\n"
    )


def test_plan_missing_a_key_exits_2_with_one_line_and_no_traceback(tmp_path: Path):
    from dapc.compile import compile_recipe

    plan = compile_recipe(REPO / "examples" / "tiny" / "recipe.yaml", output=str(tmp_path / "run")).plan
    del plan["recipe"]["training"]["lr"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    done = subprocess.run([sys.executable, "-m", "runtime.train", "--plan", str(path)], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"error: {path}: missing key recipe.training.lr\n")
