"""The trainer's pieces in one process, no launch: plan checking, the schedule, the checkpoint protocol,
model building. A few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.checkpoint import (
    CheckpointError,
    check_plan,
    clear_leftovers,
    complete_checkpoints,
    latest_checkpoint,
    save_checkpoint,
)
from runtime.train.config import PlanError, load_plan
from runtime.train.optim import lr_at, param_groups
from tests.conftest import REPO
from tests.train_support import rehash


@pytest.fixture
def tiny_plan(tmp_path: Path):
    """Returns a function writing the tiny example's plan (compiled with `overrides`), changed by `edit(plan)` and
    rehashed as dapc would, and returning its path."""
    from dapc.compile import compile_recipe

    def write(edit=None, overrides: tuple[str, ...] = ()) -> Path:
        plan = compile_recipe(REPO / "examples" / "tiny" / "recipe.yaml", overrides, output=str(tmp_path / "run")).plan
        changed = json.loads(plan.text())
        if edit:
            edit(changed)
            changed = rehash(changed)
        path = tmp_path / "plan.json"
        path.write_text(json.dumps(changed))
        return path

    return write


def test_load_plan_reads_the_tiny_example(tiny_plan):
    plan = load_plan(tiny_plan())
    assert (plan.backend, plan.world_size, plan.micro_batch, plan.grad_accum, plan.steps) == ("fsdp2", 2, 4, 1, 12)
    assert plan.fsdp.mesh == (2,) and plan.deepspeed is None and plan.memory_counter == "cpu.vm_hwm"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["batch"].pop("grad_accum"), "not a valid plan: batch.grad_accum: Field required"),
        (lambda p: p.update(schema_version=1), ("schema_version 1 is not supported (this dapc reads 5); "
                                                "compile the recipe again with this dapc")),
        (lambda p: p["recipe"]["training"].update(lr="fast"),
         "not a valid plan: recipe.training.lr: Input should be a valid number"),
        (lambda p: p["recipe"]["training"].update(seed=True),
         "not a valid plan: recipe.training.seed: Input should be a valid integer"),
        (lambda p: p["runtime"].update(backend="horovod"),
         "not a valid plan: runtime.backend: Input should be 'ddp', 'fsdp2' or 'deepspeed'"),
        (lambda p: p["batch"].update(micro_batch=3),
         "batch: micro_batch 3 × world_size 2 × grad_accum 1 = 6 ≠ global_batch_sequences 8"),
        (lambda p: p["cost"].update(steps=0), "not a valid plan: cost.steps: Input should be greater than or equal to 1"),
        (lambda p: p.pop("schema_version"),
         "not a plan: no schema_version (write one with `dapc render` or `dapc plan --json`)"),
    ],
    ids=["missing", "schema", "type", "bool-not-int", "choice", "batch-arithmetic", "positive", "not-a-plan"],
)
def test_bad_plan_is_refused_with_one_located_line(tiny_plan, edit, message: str):
    path = tiny_plan(edit)
    with pytest.raises(PlanError) as raised:
        load_plan(path)
    assert str(raised.value) == f"{path}: {message}"


def test_unreadable_plan_names_the_file(tmp_path: Path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(PlanError, match=r"^.*plan\.json: not JSON: Expecting property name enclosed in double quotes "
                                        r"at line 1 column 2$"):
        load_plan(path)


def test_schedule_warms_up_then_decays_to_the_floor(tiny_plan):
    cosine = load_plan(tiny_plan(overrides=("training.warmup_fraction=0.25",)))  # 3 of 12
    assert cosine.warmup_steps == 3
    assert [lr_at(cosine, s) for s in range(3)] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    assert lr_at(cosine, 11) == pytest.approx(1e-4)  # lr × min_lr_ratio at the last step
    assert lr_at(cosine, 7) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way through the decay
    linear = load_plan(tiny_plan(overrides=("training.schedule=linear", "training.warmup_fraction=0")))
    assert [lr_at(linear, s) for s in (0, 11)] == pytest.approx([1e-3, 1e-4])
    constant = load_plan(tiny_plan(overrides=("training.schedule=constant",)))
    assert lr_at(constant, 11) == 1e-3


def _write_step(folder: Path) -> None:
    (folder / "weights.bin").write_bytes(b"x" * 16)


def test_save_and_purge_keeps_last_k_complete_checkpoints(tmp_path: Path):
    root = tmp_path / "checkpoints"
    for step in (4, 8, 12):
        save_checkpoint(root, step, {"plan_sha256": "a" * 64}, _write_step, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-12", "step-8"]
    meta = json.loads((root / "step-12" / "meta.json").read_text())
    assert (meta["plan_sha256"], meta["step"], meta["format_version"]) == ("a" * 64, 12, 2)
    assert (root / "step-12" / "weights.bin").read_bytes() == b"x" * 16


def test_partial_and_metaless_folders_never_count_and_are_cleared(tmp_path: Path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 4, {"plan_sha256": "a" * 64}, _write_step, keep_last=2)
    (root / ".step-8.partial").mkdir()  # killed while writing step 8
    (root / ".trash-step-0").mkdir()  # killed while deleting an old one
    (root / "step-12").mkdir()  # not a checkpoint: no meta.json
    assert [s for s, _ in complete_checkpoints(root)] == [4] and latest_checkpoint(root) == root / "step-4"
    clear_leftovers(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-12", "step-4"]
    save_checkpoint(root, 12, {"plan_sha256": "a" * 64}, _write_step, keep_last=2)  # replaces the metaless folder
    assert latest_checkpoint(root) == root / "step-12"


def test_checkpoint_of_another_plan_is_refused(tmp_path: Path):
    root = tmp_path / "checkpoints"
    folder = save_checkpoint(root, 4, {"plan_sha256": "a" * 64}, _write_step, keep_last=1)
    assert check_plan(folder, "a" * 64, "plan.json")["step"] == 4
    with pytest.raises(CheckpointError) as raised:
        check_plan(folder, "b" * 64, "new/plan.json")
    assert str(raised.value) == (
        f"{folder / 'meta.json'}: checkpoint was written under plan_sha256 {'a' * 64}, but new/plan.json has "
        f"plan_sha256 {'b' * 64}; resume with the plan that wrote it, or give this plan another output directory"
    )


def test_model_follows_the_plan_seed_and_activation_checkpointing(tiny_plan):
    import torch

    from runtime.train.model import build_model, decoder_layers

    plan = load_plan(tiny_plan(overrides=("training.activation_checkpointing=true",)))
    model = build_model(plan, torch.device("cpu"))
    again = build_model(plan, torch.device("cpu"))
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert not model.config.use_cache
    assert len(decoder_layers(model)) == 4
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    decay, no_decay = param_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert sum(p.numel() for p in model.parameters()) == 5_080_192  # the plan's model.params.total
