"""The CLI surface: the shipped recipes plan, reports have --json, the schema is frozen, torch stays out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dapc.cli import main
from tests.conftest import REPO

RECIPES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "recipes").glob("*.yaml")) + [
    "examples/tiny/recipe.yaml"]


def test_the_seed_recipes_are_all_shipped():
    assert set(RECIPES) >= {
        "recipes/cyber-dap-llama3.1-8b.yaml", "recipes/cyber-dap-deepseek-r1-distill-qwen-14b.yaml",
        "recipes/cyber-dap-llama3.3-70b.yaml", "recipes/llama3.1-405b-qlora.yaml",
        "recipes/zero3-cpt-llama3.1-8b.yaml", "examples/tiny/recipe.yaml",
    }


@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_recipe_validates_and_plans(recipe):
    result = CliRunner().invoke(main, ["validate", str(REPO / recipe), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["valid"] is True
    result = CliRunner().invoke(main, ["plan", str(REPO / recipe), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["memory"]["fits"] is True


@pytest.mark.parametrize("command", ["validate", "plan", "render", "schema"])
def test_compiler_commands_never_import_torch(tmp_path, command):
    args = {"validate": ["validate", "recipes/cyber-dap-llama3.3-70b.yaml"],
            "plan": ["plan", "recipes/cyber-dap-llama3.1-8b.yaml", "--set", "strategy=auto"],
            "render": ["render", "recipes/cyber-dap-llama3.3-70b.yaml", "-o", str(tmp_path / "out")],
            "schema": ["schema"]}[command]
    code = ("import sys\nfrom dapc.cli import main\n"
            "try:\n    main(standalone_mode=False)\nfinally:\n"
            "    heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'accelerate', 'peft', 'pydantic') if m in sys.modules)\n"
            "    print('HEAVY', heavy, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stderr


def test_recipe_json_schema_is_frozen():
    """Changing the recipe surface is deliberate: regenerate with DAPC_UPDATE_GOLDEN=1 and review the diff."""
    result = CliRunner().invoke(main, ["schema"])
    golden = REPO / "tests" / "golden" / "recipe.schema.json"
    if os.environ.get("DAPC_UPDATE_GOLDEN"):
        golden.write_text(result.stdout)
    assert result.exit_code == 0
    assert result.stdout == golden.read_text()


def test_plan_json_carries_the_contract_keys(tmp_path):
    result = CliRunner().invoke(main, ["plan", str(REPO / "examples/tiny/recipe.yaml"), "--json"])
    plan = json.loads(result.stdout)
    assert {"schema_version", "recipe", "recipe_sha256", "plan_sha256", "provenance", "model", "method", "strategy",
            "batch", "activation_checkpointing", "memory", "alternatives", "cost"} <= set(plan)
    assert set(plan["model"]["params"]) == {"total", "embedding", "attention", "mlp", "norms", "lm_head", "experts"}
    assert set(plan["memory"]["per_gpu_bytes"]) == {"weights", "gradients", "optimizer", "activations", "logits",
                                                      "buffers", "total"}
    assert {"device_capacity_bytes", "headroom_bytes", "fits", "counter", "cpu_per_node_bytes",
            "nvme_per_node_bytes"} <= set(plan["memory"])
    assert {"tokens", "tokens_exact", "step_seconds", "steps", "wall_seconds", "gpu_hours", "usd", "kwh"} <= set(
        plan["cost"])
    assert plan["memory"]["counter"] == "cpu.vm_hwm"
    assert plan["model"]["tied"] is True and plan["model"]["params"]["lm_head"] == 0


def test_render_output_flag_overrides_the_recipe_output(tmp_path):
    out = tmp_path / "elsewhere"
    result = CliRunner().invoke(main, ["render", str(REPO / "examples/tiny/recipe.yaml"), "-o", str(out), "--json"])
    assert result.exit_code == 0
    written = json.loads(result.stdout)
    assert written["output_dir"] == str(out)
    assert sorted(Path(p).name for p in written["files"]) == [
        "README.md", "job.sbatch", "launch.sh", "plan.json", "pytorchjob.yaml"]
    assert json.loads((out / "plan.json").read_text())["paths"]["checkpoint_dir"] == str(out / "checkpoints")


def test_plan_prints_the_memory_table_and_the_reason(tmp_path):
    result = CliRunner().invoke(main, ["plan", str(REPO / "recipes/zero3-cpt-llama3.1-8b.yaml")])
    assert result.exit_code == 0
    text = result.stdout
    assert "strategy: zero3 (pinned): pinned by the recipe; fits (" in text
    for component in ("weights", "gradients", "optimizer", "activations", "logits", "buffers", "total"):
        assert f"│ {component}" in text
    # The chunked loss (auto on GPUs) leaves room for micro-batch 2 without activation checkpointing.
    assert "batch: micro_batch 2 × grad_accum 16 × 8 GPUs = 256 sequences × 4,096 tokens = 1,048,576 tokens/step" in text
    assert "loss: chunked by 1024 positions: auto on GPUs" in text


def test_set_overrides_reach_the_plan():
    result = CliRunner().invoke(main, ["plan", str(REPO / "recipes/llama3.1-405b-qlora.yaml"), "--json",
                                       "--set", "hardware.nodes=2", "--set", "training.lr=3e-4"])
    plan = json.loads(result.stdout)
    assert plan["batch"]["world_size"] == 16 and plan["recipe"]["training"]["lr"] == 3e-4


def test_wheel_install_finds_templates_and_recipes(tmp_path):
    """Built as a wheel and installed into a fresh virtualenv, `dapc render` still finds its templates."""
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(wheel_dir), str(REPO)], check=True, capture_output=True)
    wheel = next(wheel_dir.glob("dapc-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True)
    recipe = REPO / "recipes" / "cyber-dap-llama3.3-70b.yaml"
    result = subprocess.run([str(venv / "bin" / "dapc"), "render", str(recipe), "-o", str(tmp_path / "out")],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "job.sbatch").exists()
    located = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import dapc.resources as r; print(r.data_dir('templates')); import runtime"],
                             cwd=tmp_path, capture_output=True, text=True)
    assert located.returncode == 0, located.stderr
    assert "site-packages/dapc/_data/templates" in located.stdout
