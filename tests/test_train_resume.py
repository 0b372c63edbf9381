"""Refusals: a checkpoint of another plan; a bad plan. (Kill -9 and relaunch: tests/test_e2e_launch.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.train_support import (
    compile_plan,
    read_plan,
    rehash,
    run_env,
    train,
)


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
        f"plan_sha256 {read_plan(other)['plan_sha256']} and trains something else (model, method, data, global "
        "batch, schedule or numerics differ); resume with the plan that wrote it, or give this plan another output "
        "directory\n"
    )


def test_plan_missing_a_key_exits_2_with_one_line_and_no_traceback(tmp_path: Path):
    from dapc.compile import compile_recipe

    plan = json.loads(compile_recipe(REPO / "examples" / "tiny" / "recipe.yaml", output=str(tmp_path / "run")).plan.text())
    del plan["recipe"]["training"]["lr"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(rehash(plan)))
    done = subprocess.run([sys.executable, "-m", "runtime.train", "--plan", str(path)], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (
        2, "", f"error: {path}: not a valid plan: recipe.training.lr: missing (a plan is complete: no default is "
               "filled in at run time)\n")


def _agree(rank: int, port: int, folders: list, results) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from runtime.checkpoint import CheckpointError
    from runtime.train.distributed import Distributed
    from runtime.train.loop import _agree_on_resume

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    d = Distributed(rank, rank, 2, torch.device("cpu"), timedelta(seconds=60))
    plan = type("Plan", (), {"checkpoint_dir": "/run/checkpoints"})()
    try:
        _agree_on_resume(None if folders[rank] is None else Path(folders[rank]), d, plan)
        results[rank] = "agreed"
    except CheckpointError as e:
        results[rank] = str(e)
    finally:
        dist.destroy_process_group()


def test_ranks_that_find_different_newest_checkpoints_all_refuse_to_resume():
    """Another run still saving into the same checkpoint_dir (a job not yet stopped) can show one rank step-8 and
    another step-4: every rank stops, naming what each found, rather than resuming from two steps."""
    import torch.multiprocessing as mp

    from tests.train_support import free_port

    for folders, expected in ((["/c/step-8", "/c/step-4"], "rank 0: step-8, rank 1: step-4"),
                              (["/c/step-4", "/c/step-4"], None), ([None, None], None)):
        results = mp.Manager().dict()
        mp.spawn(_agree, args=(free_port(), folders, results), nprocs=2, join=True)
        if expected is None:
            assert dict(results) == {0: "agreed", 1: "agreed"}
        else:
            assert results[0] == results[1] and expected in results[0] and "another run" in results[0]
