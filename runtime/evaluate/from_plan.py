"""The rendered job's last step: evaluate the export against the base, as the plan's `recipe.eval` says.

Base model: the pretrained source, or, for a random init, the same seeded model the trainer started from
(materialized once under `paths.eval_dir`). Adapted model: the export; a LoRA export holding only
adapters is merged into its base first. Domain perplexity reads the validation split `prepare` held out;
general perplexity reads `recipe.eval.general_text`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dapc.errors import DapcError
from dapc.plan_schema import load_plan
from runtime.evaluate.run import EvaluationResult, run_evaluation
from runtime.train.config import TrainPlan
from runtime.train.config import train_plan as train_plan_of
from runtime.train.tracking import Tracker, eval_scalars

BASE_DIR_NAME = "base-model"
MERGED_DIR_NAME = "adapted-model"


def _validation_windows(prepared_dirs: list[str]):
    """Returns a function giving the held-out sequences of these prepared directories as token-id lists, or None
    when there are none."""
    from runtime.data import PackedDataset

    datasets = []
    for prepared_dir in prepared_dirs:
        try:
            datasets.append(PackedDataset(prepared_dir, split="validation"))
        except (DapcError, FileNotFoundError):
            continue
    if not any(len(d) for d in datasets):
        return None
    return lambda: [d[i].tolist() for d in datasets for i in range(len(d))]


def _save_with_tokenizer(model: Any, tokenizer_spec: str, target: Path) -> Path:
    from runtime.tokenizer import load_tokenizer

    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(str(staging))
    load_tokenizer(tokenizer_spec).save_pretrained(str(staging))
    staging.rename(target)
    return target


def _base_model_dir(train_plan: TrainPlan, eval_dir: Path) -> str:
    from runtime.train.model import base_model

    if train_plan.model_init == "pretrained":
        return train_plan.model_source
    target = eval_dir / BASE_DIR_NAME
    if not (target / "config.json").exists():
        _save_with_tokenizer(base_model(train_plan), train_plan.tokenizer, target)
    return str(target)


def _adapted_model_dir(train_plan: TrainPlan, export_dir: Path, eval_dir: Path) -> str:
    if (export_dir / "config.json").exists():
        return str(export_dir)
    adapter = export_dir / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise DapcError("no exported model here: run training to the end first (it exports on completion)",
                        str(export_dir))
    target = eval_dir / MERGED_DIR_NAME
    if not (target / "config.json").exists():
        from peft import PeftModel

        from runtime.train.model import base_model

        merged = PeftModel.from_pretrained(base_model(train_plan), str(adapter)).merge_and_unload()
        _save_with_tokenizer(merged, train_plan.tokenizer, target)
    return str(target)


def evaluate_from_plan(plan_path: str | Path, device: str | None = None) -> EvaluationResult:
    """Runs the plan's evaluation (adapted vs base) and returns its result; files go to `paths.eval_dir`."""
    plan = load_plan(plan_path)
    train_plan = train_plan_of(plan, str(plan_path))
    settings, paths = plan.recipe.eval, plan.paths
    eval_dir = Path(paths.eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    adapted = _adapted_model_dir(train_plan, Path(paths.export_dir), eval_dir)
    result = run_evaluation(
        adapted,
        {bench.name: bench.path for bench in settings.benchmarks},
        eval_dir,
        compare_to=_base_model_dir(train_plan, eval_dir),
        general_text=list(settings.general_text) or None,
        domain_text=_validation_windows([s.prepared_dir for s in plan.corpus.sources if s.role == "domain"]),
        mode=settings.mode,
        k_shot=settings.k_shot,
        limit=settings.limit,
        ppl_seq_len=plan.batch.seq_len,
        device=device,
    )
    # The scores join the training's tracked runs (TensorBoard, W&B, MLflow), at its last step.
    Tracker(train_plan).evaluation(train_plan.steps, eval_scalars(result.results))
    return result
