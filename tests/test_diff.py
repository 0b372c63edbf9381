"""`dapc diff A B`: the resolved fields that differ and what they change, for recipes and plan.json files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dapc.cli import main
from dapc.memory import GIB
from tests.conftest import REPO

FULL_ON_ONE_NODE = {"method": {"name": "full"}, "hardware": {"nodes": 1}}
LORA_ON_TWO_NODES = {"method": {"name": "lora"}, "hardware": {"nodes": 2}}


def _invoke(*args: str):
    return CliRunner().invoke(main, ["diff", *map(str, args)])


def _rows(text: str) -> list[tuple[str, ...]]:
    """The table rows of rich output as stripped cells (wrapped cells are left as their first line)."""
    return [tuple(cell.strip() for cell in line.strip("│").split("│")) for line in text.splitlines()
            if line.startswith("│")]


def _plan(path: Path) -> dict:
    result = CliRunner().invoke(main, ["plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def two_recipes(minimal_recipe):
    """Returns (A, B): the minimal recipe full on one node, and LoRA on two."""
    return minimal_recipe(FULL_ON_ONE_NODE, name="a.yaml"), minimal_recipe(LORA_ON_TWO_NODES, name="b.yaml")


def test_diff_table_shows_the_changed_fields_and_their_effect(two_recipes):
    a, b = two_recipes
    result = _invoke(a, b)
    assert result.exit_code == 0, result.output
    plan_a, plan_b = _plan(a), _plan(b)
    rows = _rows(result.stdout)
    assert result.stdout.startswith(f"A: {a} (recipe)\nB: {b} (recipe)\nplan_sha256: {plan_a['plan_sha256'][:12]} → "
                                    f"{plan_b['plan_sha256'][:12]}, differ\n")
    assert ("recipe.method.name", "full", "lora") in rows
    assert ("recipe.hardware.nodes", "1", "2") in rows
    assert ("batch.world_size", "8", "16") in rows
    total_a, total_b = (p["memory"]["per_gpu_bytes"]["total"] / GIB for p in (plan_a, plan_b))
    total_row = next(row for row in rows if row[0] == "memory/GPU total (GiB)")
    assert total_row[1:3] == (f"{total_a:,.2f}", f"{total_b:,.2f}")
    ratio = (total_b - total_a) / total_a
    assert total_row[3] == f"{total_b - total_a:+,.2f} ({ratio:{'+.1%' if abs(ratio) < 0.1 else '+.0%'}})"
    assert ("GPUs (world size)", "8", "16", "+8 (+100%)") in rows
    assert ("strategy", plan_a["strategy"]["name"], plan_b["strategy"]["name"],
            "changed" if plan_a["strategy"]["name"] != plan_b["strategy"]["name"] else "") in rows
    labels = [row[0] for row in rows]
    for label in ("memory/GPU weights (GiB)", "memory/GPU optimizer (GiB)", "fits", "micro-batch",
                  "grad accumulation", "steps", "step time (s)", "wall time (h)", "GPU-hours", "cost (USD)",
                  "energy (kWh)"):
        assert label in labels


def test_diff_json_carries_both_parts_with_each_plans_numbers(two_recipes):
    a, b = two_recipes
    result = _invoke(a, b, "--json")
    assert result.exit_code == 0, result.output
    diff = json.loads(result.stdout)
    assert result.stdout == json.dumps(diff, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    plan_a, plan_b = _plan(a), _plan(b)
    assert diff["a"] == {"path": str(a), "kind": "recipe"} and diff["differ"] is True
    assert diff["hashes"]["plan_sha256"] == {"a": plan_a["plan_sha256"], "b": plan_b["plan_sha256"], "differ": True}
    fields = {f["path"]: (f.get("a"), f.get("b")) for f in diff["fields"]}
    assert fields["recipe.method.name"] == ("full", "lora")
    assert fields["recipe.hardware.nodes"] == (1, 2)
    assert fields["method.trainable_params"] == (plan_a["method"]["trainable_params"],
                                                 plan_b["method"]["trainable_params"])
    assert not any(path.startswith(("memory.", "cost.", "provenance", "alternatives")) or path.endswith("_sha256")
                   for path in fields)
    effects = diff["effects"]
    for key in ("memory.per_gpu_bytes.total", "memory.per_gpu_bytes.weights", "memory.per_gpu_bytes.optimizer",
                "batch.world_size", "batch.micro_batch", "batch.grad_accum", "cost.steps", "cost.step_seconds",
                "cost.wall_seconds", "cost.gpu_hours", "cost.usd", "cost.kwh"):
        section, *rest = key.split(".")
        value_a, value_b = plan_a[section], plan_b[section]
        for part in rest:
            value_a, value_b = value_a[part], value_b[part]
        assert effects[key] == {"a": value_a, "b": value_b, "delta": value_b - value_a}, key
    assert effects["memory.fits"] == {"a": True, "b": True, "delta": None}
    assert effects["strategy.name"]["a"] == plan_a["strategy"]["name"]


def test_recipe_and_its_rendered_plan_have_no_field_differences(minimal_recipe, tmp_path):
    run = tmp_path.resolve() / "run"
    recipe = minimal_recipe({"output": str(run)})
    assert CliRunner().invoke(main, ["render", str(recipe), "-o", str(run)]).exit_code == 0
    result = _invoke(recipe, run / "plan.json", "--exit-code")
    assert result.exit_code == 0, result.output
    assert "\nno resolved field differs: the plans are identical\n" in result.stdout
    assert "Resolved fields that differ" not in result.stdout
    assert all(row[-1] == "" for row in _rows(result.stdout))  # no change in any effect
    diff = json.loads(_invoke(recipe, run / "plan.json", "--json").stdout)
    assert diff["fields"] == [] and diff["differ"] is False and diff["b"]["kind"] == "plan"


def test_two_plan_files_diff_like_their_recipes(two_recipes, tmp_path):
    a, b = two_recipes
    plans = []
    for recipe in (a, b):
        plans.append(tmp_path / f"{recipe.stem}-plan.txt")  # told apart by content, not only by a .json suffix
        plans[-1].write_text(CliRunner().invoke(main, ["plan", str(recipe), "--json"]).stdout)
    from_recipes = json.loads(_invoke(a, b, "--json").stdout)
    from_plans = json.loads(_invoke(*plans, "--json").stdout)
    assert from_plans["a"] == {"path": str(plans[0]), "kind": "plan"}
    assert from_plans["fields"] == from_recipes["fields"] and from_plans["effects"] == from_recipes["effects"]


def test_set_a_and_set_b_override_each_recipe(minimal_recipe):
    recipe = minimal_recipe()
    diff = json.loads(_invoke(recipe, recipe, "--set-a", "hardware.nodes=2", "--set-b", "training.lr=1e-4",
                              "--json").stdout)
    fields = {f["path"]: (f.get("a"), f.get("b")) for f in diff["fields"]}
    assert fields["recipe.hardware.nodes"] == (2, 1)
    assert fields["recipe.training.lr"][1] == 1e-4


def test_a_plan_that_does_not_fit_still_diffs_with_exit_0(minimal_recipe):
    recipe = minimal_recipe()
    result = _invoke(recipe, recipe, "--set-b", "model.source=meta-llama/Llama-3.1-70B", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["effects"]["memory.fits"] == {"a": True, "b": False, "delta": None}
    text = _invoke(recipe, recipe, "--set-b", "model.source=meta-llama/Llama-3.1-70B").stdout
    assert ("fits", "yes", "no", "changed") in _rows(text)


def test_exit_code_flag_exits_1_only_when_the_plans_differ(two_recipes):
    a, b = two_recipes
    assert _invoke(a, b, "--exit-code").exit_code == 1
    assert _invoke(a, a, "--exit-code").exit_code == 0
    assert _invoke(a, b).exit_code == 0


def test_section_against_null_lists_the_null_then_the_sections_fields(minimal_recipe):
    recipe = minimal_recipe()
    diff = json.loads(_invoke(recipe, recipe, "--set-a", "strategy=fsdp2-full", "--set-b", "strategy=zero2",
                              "--json").stdout)
    paths = [f["path"] for f in diff["fields"]]
    fsdp = paths.index("runtime.fsdp")
    assert diff["fields"][fsdp] == {"path": "runtime.fsdp", "b": None}
    assert paths[fsdp + 1].startswith("runtime.fsdp.") and diff["fields"][fsdp + 1].keys() == {"path", "a"}


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.yaml", "recipe file not found"),
    (lambda d: d / "missing.json", "cannot read the plan: No such file or directory"),
    (lambda d: _write(d / "garbage.yaml", "name: [\n"), "invalid YAML"),
    (lambda d: _write(d / "binary.yaml", "\x00\x01\x02"), "invalid YAML"),
    (lambda d: _write(d / "other.json", '{"a": 1}'), "not a plan: no schema_version"),
    (lambda d: _write(d / "broken.json", '{"schema_version": 3,'), "not JSON"),
    (lambda d: _write(d / "list.yaml", "- 1\n- 2\n"), "a recipe is a mapping of sections, got a list"),
    (lambda d: d, "not a regular file"),
])
def test_hostile_input_is_one_located_line_and_exit_2(minimal_recipe, tmp_path, make, message):
    good = minimal_recipe()
    bad = make(tmp_path)
    for args in ((bad, good), (good, bad)):
        result = _invoke(*args)
        assert result.exit_code == 2, result.output
        assert result.stdout == ""
        assert result.stderr.startswith(f"error: {bad}") and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


def test_set_on_a_plan_file_is_refused(minimal_recipe, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(CliRunner().invoke(main, ["plan", str(minimal_recipe()), "--json"]).stdout)
    result = _invoke(plan, plan, "--set-b", "hardware.nodes=2")
    assert result.exit_code == 2
    assert result.stderr == (f"error: {plan}: --set-b overrides a recipe's fields, and this is a plan.json; diff "
                             "its recipe instead\n")


def test_diff_never_imports_torch():
    code = ("import sys\nfrom dapc.cli import main\n"
            "try:\n    main(standalone_mode=False)\nfinally:\n"
            "    heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'accelerate', 'peft') if m in sys.modules)\n"
            "    print('HEAVY', heavy, file=sys.stderr)\n")
    args = ["diff", "recipes/cyber-dap-llama3.1-8b.yaml", "recipes/zero3-cpt-llama3.1-8b.yaml"]
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stderr


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
