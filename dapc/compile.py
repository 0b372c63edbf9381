"""The compiler's front door: recipe file → loaded recipe → spec → decision → plan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dapc.errors import RecipeError
from dapc.plan import build_plan
from dapc.plan_schema import Plan
from dapc.planner import Decision, PlanInputError, plan
from dapc.recipe import LoadedRecipe, load_recipe
from dapc.resolve import Spec, resolve


@dataclass(frozen=True)
class Compiled:
    """Every stage's result for one recipe."""

    loaded: LoadedRecipe
    spec: Spec
    decision: Decision
    plan: Plan


def compile_recipe(path: str | Path, overrides: tuple[str, ...] = (), output: str | None = None) -> Compiled:
    """Returns the compiled plan of the recipe at `path`. Raises DapcError (exit 2) for bad input."""
    loaded = load_recipe(path, overrides)
    spec = resolve(loaded, output_override=output)
    try:
        decision = plan(spec)
        return Compiled(loaded, spec, decision, build_plan(spec, decision))
    except PlanInputError as e:
        raise RecipeError(e.message, loaded.locate(*e.key_path)) from e
