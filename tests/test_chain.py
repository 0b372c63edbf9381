"""Training in stages, CPT → SFT → DPO, each stage a recipe that starts from the previous one's export: the tiny
chain run for real (two steps a stage) in a fresh copy of the repository with nothing beside it, and the 8B chain
planned, all three stages, before any has run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from dapc.compile import compile_recipe
from tests.test_readme_example import _fresh_copy
from tests.train_support import RUN_TIMEOUT_SECONDS, read_plan, records, run_env, train

SHORT = ("training.max_steps=2", "checkpoint.every_steps=2")


def _render(copy: Path, stage: str, *overrides: str) -> Path:
    """Renders examples/chain/<stage>.yaml in `copy`; returns its plan (the recipe's output: runs/chain-<stage>)."""
    sets = [f"--set={o}" for o in overrides]
    done = subprocess.run([sys.executable, "-m", "dapc", "render", f"examples/chain/{stage}.yaml", *sets], cwd=copy,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return copy / "runs" / f"chain-{stage}" / "plan.json"


def test_the_tiny_chain_trains_stage_after_stage_from_a_fresh_clone(tmp_path: Path):
    copy = _fresh_copy(tmp_path / "x" / "repo")
    assert not (copy.parent / "shared").exists()
    stages, prev = {}, None
    for stage in ("cpt", "sft", "dpo"):
        plan = _render(copy, stage, *SHORT)
        p = read_plan(plan)
        if stage != "cpt":  # the previous stage has exported by now: read as a folder, not from its plan
            assert p["provenance"]["model_source"]["kind"] == "folder"
            assert p["recipe"]["model"]["source"] == str(copy / "runs" / f"chain-{prev}" / "export")
        subprocess.run([sys.executable, "-m", "runtime.prepare", "--plan", str(plan), "--no-progress"], cwd=copy,
                       env=run_env(plan), check=True, capture_output=True, timeout=RUN_TIMEOUT_SECONDS)
        train(plan, 2)
        assert (plan.parent / "export" / "config.json").is_file()
        stages[stage], prev = plan, stage
    dpo = read_plan(stages["dpo"])
    assert (dpo["objective"]["name"], dpo["objective"]["preference"]["reference"]) == ("dpo", "adapters-off")
    first = records(stages["dpo"], "step")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-5  # at its first step the policy is its reference
    assert "rewards_margin" in first and "rewards_accuracy" in first
    # The merged DPO export is a whole model the next stage (or an evaluation) reads.
    config = json.loads((stages["dpo"].parent / "export" / "config.json").read_text())
    assert config["hidden_size"] == dpo["model"]["config"]["hidden_size"]


def test_the_8b_chain_plans_all_three_stages_before_any_has_run(tmp_path: Path):
    copy = _fresh_copy(tmp_path / "repo")
    for recipe in ("recipes/cyber-dap-llama3.1-8b.yaml", "recipes/chain/cyber-sft-llama3.1-8b.yaml"):
        done = subprocess.run([sys.executable, "-m", "dapc", "render", recipe], cwd=copy, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    sft_plan = copy / "runs" / "cyber-sft-llama3.1-8b" / "plan.json"
    compiled = compile_recipe(copy / "recipes" / "chain" / "cyber-dpo-llama3.1-8b.yaml")
    plan = compiled.plan
    assert compiled.decision.fits and plan.model.params.total == 8_030_261_248
    assert plan.provenance.model_source.kind == "export-of-plan"
    assert plan.provenance.model_source.producer_plan == str(sft_plan)
    assert plan.provenance.model_source.producer_plan_sha256 == read_plan(sft_plan)["plan_sha256"]
    assert plan.objective.preference.reference == "copy" and "reference copy" in plan.memory.formulas.weights
    assert any("does not exist yet" in w for w in plan.warnings)
