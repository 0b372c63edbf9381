"""Where a recipe's model comes from: a local folder, the catalog, the Hugging Face cache, or the export of
another recipe's run (training in stages, CPT → SFT → DPO, each stage a recipe whose `model.source` is the
previous stage's `paths.export_dir`).

A stage is planned before the stage it starts from has run: when `model.source` names a folder that does not
exist yet but whose parent holds the dapc plan.json whose `paths.export_dir` it is, the model's config and
tokenizer come from that plan, and the spec says so (`ModelSource`, and a warning). An export that holds (or
will hold) LoRA adapters only is refused: there is no full model to plan or to load.

Not re-exported by `dapc.models`: it reads plan.json through `dapc.plan_schema`, which imports `dapc.models`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dapc.errors import ModelNotFoundError
from dapc.models.architecture import (
    Architecture,
    ConfigKind,
    adapters_only_message,
    architecture_of_config,
    find_config,
    local_path,
    read_config,
)
from dapc.plan_schema import PlanError, load_plan

__all__ = ["PLAN_FILENAME", "ModelSource", "ModelSourceKind", "ResolvedModel", "resolve_model_source"]

PLAN_FILENAME = "plan.json"  # what `dapc render` writes into the run directory
ModelSourceKind = Literal[ConfigKind, "export-of-plan"]


@dataclass(frozen=True)
class ModelSource:
    """Where the model's config was read: `kind`, and for the export of a run not trained yet, that run's
    plan.json (`producer_plan`, absolute) and its `plan_sha256`; None for the other kinds."""

    kind: ModelSourceKind
    producer_plan: str | None = None
    producer_plan_sha256: str | None = None


@dataclass(frozen=True)
class ResolvedModel:
    """A recipe's model, looked up: its architecture, its HF config (without `_`-keys), the source the runtime
    loads (an absolute path for anything on disk), the tokenizer that goes with it when `data.tokenizer` is
    unset, where it came from, and a warning (unlocated) when it is an export that does not exist yet."""

    arch: Architecture
    config: dict[str, Any]
    source: str
    tokenizer: str
    provenance: ModelSource
    warning: str | None = None


def resolve_model_source(source: str, base_dir: Path, init: str) -> ResolvedModel:
    """Returns the model `source` names (a relative path resolves against `base_dir`), offline; `init` is the
    recipe's `model.init`, which decides what a missing export means for training.

    Raises `ModelNotFoundError` (no location: the caller's is the recipe's) saying what was looked for, and
    `ModelConfigError` (located in the config file) for a config that is unusable.
    """
    local = local_path(source, base_dir).resolve()
    plan_file = local.parent / PLAN_FILENAME
    if not local.exists() and _only_a_path(source):
        if plan_file.is_file():
            return _export_of_plan(source, local, plan_file, init)
        raise ModelNotFoundError(
            f"no model at {local}: no such folder, and no {plan_file} of a run that exports there; fix the path, "
            "or render the recipe that produces it first (a run rendered with `dapc render RECIPE -o DIR` "
            "exports to DIR/export)")
    try:
        found = find_config(source, base_dir)
    except ModelNotFoundError:
        if "/" in source and not local.exists() and plan_file.is_file():  # org/name-shaped, e.g. `stage1/export`
            return _export_of_plan(source, local, plan_file, init)
        raise
    config = {k: v for k, v in read_config(found.path).items() if not k.startswith("_")}
    arch = architecture_of_config(found.name, config, str(found.path))
    on_disk = str(local) if found.kind == "folder" else source
    return ResolvedModel(arch, config, on_disk, on_disk, ModelSource(found.kind))


def _only_a_path(source: str) -> bool:
    """Whether `source` can name nothing but a path: absolute, led by `.` or `~`, or with more than the one
    `/` of an `org/name` id (catalog names and the HF cache use those)."""
    return source.startswith((".", "~")) or Path(source).is_absolute() or source.count("/") > 1


def _export_of_plan(source: str, local: Path, plan_file: Path, init: str) -> ResolvedModel:
    """The model the run planned in `plan_file` will export to `local`, which does not exist yet."""
    try:
        plan = load_plan(plan_file)
    except PlanError as e:
        raise ModelNotFoundError(f"{local} does not exist yet, and the plan beside it cannot say what it will "
                                 f"hold: {e}") from e
    export = Path(plan.paths.export_dir)
    if export != local:
        raise ModelNotFoundError(f"{local} does not exist, and {plan_file} exports to {export}, not there; point "
                                 "model.source at that run's export folder, or at a folder holding config.json")
    method = plan.method.name
    if method != "full" and not plan.recipe.checkpoint.merge_lora:
        raise ModelNotFoundError(adapters_only_message(
            f"{export}, the export planned in {plan_file}, holds only LoRA adapters (method {method} without "
            "checkpoint.merge_lora)"))
    arch = architecture_of_config(source, dict(plan.model.config), str(plan_file))
    needs = ("training loads its weights, so that run must train and export first" if init == "pretrained" else
             "model.init random builds the model from that config alone, without the export's weights")
    warning = (f"{export} does not exist yet: planned from {plan_file}, the plan of run {plan.recipe.name!r} that "
               f"exports there (its model.config, and its tokenizer unless data.tokenizer is set); {needs}")
    provenance = ModelSource("export-of-plan", str(plan_file), plan.plan_sha256)
    tokenizer = plan.recipe.data.tokenizer  # resolved by the producer's compile (load_plan refuses a null)
    return ResolvedModel(arch, dict(plan.model.config), str(export), tokenizer, provenance, warning)
