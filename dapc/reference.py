"""Where a preference run's reference log-probabilities come from, decided once from the recipe: the memory model,
the time model, the compatibility checks and plan.json `objective.preference.reference` all read it here."""

from __future__ import annotations

from dapc.recipe import Recipe


def reference_kind(recipe: Recipe) -> str:
    """Returns the dpo reference: `precomputed` (training.preference.reference), `adapters-off` (LoRA/QLoRA: the
    base with the adapters disabled) or `copy` (full training: a frozen copy of the starting model); `none` for
    orpo and for every objective without a reference."""
    t = recipe.training
    if t.objective != "dpo":
        return "none"
    if t.preference.reference == "precomputed":
        return "precomputed"
    return "adapters-off" if recipe.method.name in ("lora", "qlora") else "copy"
