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
