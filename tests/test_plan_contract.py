"""plan.json is one typed contract: one reader, one list per concept, and the runtime does what the plan says."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dapc.plan_schema import SCHEMA_VERSION
from tests.conftest import REPO
from tests.train_support import rehash, run_env

RUNTIME = REPO / "runtime"


def _runtime_sources() -> list[Path]:
    return sorted(p for p in RUNTIME.rglob("*.py") if "lm_eval_tasks" not in p.parts)


def _mentions_plan(node: ast.AST) -> bool:
    return "plan" in ast.unparse(node).lower()


def _offences(source: str, where: str) -> list[str]:
    """Ways `source` reads plan.json other than through the typed loader."""
    found = []
    for node in ast.walk(ast.parse(source)):
        at = f"{where}:{getattr(node, 'lineno', 0)}"
        # plan["recipe"], self.plan["x"]: indexing a raw plan dict.
        if isinstance(node, ast.Subscript) and _mentions_plan(node.value):
            found.append(f"{at}: indexes {ast.unparse(node)}")
        # json.load(s) of anything plan-shaped: a second reader.
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("load", "loads")
                and ast.unparse(node.func.value) == "json" and any(_mentions_plan(a) for a in node.args)):
            found.append(f"{at}: parses {ast.unparse(node)}")
        # open(...plan...) outside the loader.
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open"
                and any(_mentions_plan(a) for a in node.args)):
            found.append(f"{at}: opens {ast.unparse(node)}")
    return found


def test_no_runtime_module_reads_plan_json_but_through_the_typed_loader():
    offences = [hit for path in _runtime_sources()
                for hit in _offences(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert offences == []


def test_the_checker_catches_a_second_reader():
    source = 'import json\nplan = json.loads(open(plan_path).read())\nlr = plan["recipe"]["training"]["lr"]\n'
    assert _offences(source, "m.py") == [
        "m.py:2: parses json.loads(open(plan_path).read())",
        "m.py:3: indexes plan['recipe']['training']['lr']",
        "m.py:3: indexes plan['recipe']['training']",
        "m.py:3: indexes plan['recipe']",
        "m.py:2: opens open(plan_path)",
    ]


@pytest.mark.parametrize("entry", [
    ["-m", "runtime.prepare"], ["-m", "runtime.train"], ["-m", "runtime.evaluate"], ["-m", "runtime.export"],
], ids=["prepare", "train", "evaluate", "export"])
def test_every_runtime_entry_point_refuses_another_schema_version_with_the_loaders_line(tmp_path, entry):
    from dapc.compile import compile_recipe

    plan = json.loads(compile_recipe(REPO / "examples" / "tiny" / "recipe.yaml", output=str(tmp_path / "run")).plan.text())
    plan["schema_version"] = 1
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(rehash(plan)))
    done = subprocess.run([sys.executable, *entry, "--plan", str(path)], cwd=REPO, env={**run_env(), "COLUMNS": "400"},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: {path}: schema_version 1 is not supported (this dapc reads {SCHEMA_VERSION}); compile the recipe again with this dapc"]


def test_an_edited_plan_is_refused_by_its_hash(tmp_path):
    from dapc.compile import compile_recipe
    from dapc.plan_schema import PlanError, load_plan

    plan = json.loads(compile_recipe(REPO / "examples" / "tiny" / "recipe.yaml", output=str(tmp_path / "run")).plan.text())
    plan["recipe"]["training"]["lr"] = 0.5
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    with pytest.raises(PlanError, match=r"plan_sha256 does not match the plan's content"):
        load_plan(path)


def test_strategy_literal_is_the_strategy_table():
    from dapc.plan_schema import Alternative
    from dapc.recipe.schema import STRATEGY_NAMES
    from dapc.strategies import PREFERENCE_ORDER, STRATEGIES

    assert set(STRATEGIES) == set(STRATEGY_NAMES) == set(PREFERENCE_ORDER)
    assert len(STRATEGY_NAMES) == len(STRATEGIES)
    assert Alternative.model_fields["strategy"].annotation.__args__ == STRATEGY_NAMES


def test_one_dtype_table_and_one_linear_module_list():
    import torch

    from dapc.dtypes import DTYPE_BYTES, PRECISIONS, TORCH_DTYPE_NAMES
    from dapc.models import LINEAR_MODULES
    from dapc.recipe.schema import LoraSection
    from runtime.train.model import DTYPES

    assert set(TORCH_DTYPE_NAMES) == set(DTYPE_BYTES) == set(PRECISIONS)
    for name in PRECISIONS:
        dtype = getattr(torch, TORCH_DTYPE_NAMES[name])
        assert DTYPES[name] == DTYPES[TORCH_DTYPE_NAMES[name]] == dtype
        assert dtype.itemsize == DTYPE_BYTES[name]
    assert tuple(LoraSection().target_modules) == LINEAR_MODULES


@pytest.mark.parametrize(("strategy", "model_dtype", "precision", "base_dtype"), [
    ("ddp", "fp32", "bf16", "fp32"),  # the divergence this closes: counted 2 bytes, loaded 4
    ("ddp", "bf16", "bf16", "bf16"),
    ("fsdp2-full", "fp32", "bf16", "bf16"),  # one all-gather dtype: the FSDP2 param dtype
    ("zero2", "fp32", "bf16", "bf16"),  # DeepSpeed casts the module to its precision
])
def test_lora_base_dtype_is_decided_once_counted_and_built(tmp_path, strategy, model_dtype, precision, base_dtype):
    import torch

    from dapc.compile import compile_recipe
    from dapc.dtypes import DTYPE_BYTES, TORCH_DTYPE_NAMES
    from runtime.train.config import train_plan
    from runtime.train.model import build_model

    plan = compile_recipe(REPO / "examples" / "tiny" / "recipe.yaml",
                          ("method.name=lora", f"strategy={strategy}", f"model.dtype={model_dtype}",
                           f"training.precision={precision}", "hardware.gpus_per_node=1"),
                          output=str(tmp_path / "run")).plan
    assert plan.loading.base_dtype == base_dtype
    frozen = plan.model.params.total * DTYPE_BYTES[base_dtype]
    trained = plan.method.trainable_params * DTYPE_BYTES[plan.loading.trained_dtype]
    assert plan.memory.per_gpu_bytes.weights == frozen + trained
    if strategy.startswith("zero"):
        return  # DeepSpeed casts at initialize; the build below is DDP's and FSDP2's
    model = build_model(train_plan(plan, "plan.json"), torch.device("cpu"))
    frozen_dtypes = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen_dtypes == {getattr(torch, TORCH_DTYPE_NAMES[base_dtype])}
