"""The recipe: schema, loading with source positions, `base:` inheritance and `--set` overrides."""

from dapc.recipe.load import LoadedRecipe, load_recipe
from dapc.recipe.schema import STRATEGY_NAMES, Recipe

__all__ = ["LoadedRecipe", "Recipe", "STRATEGY_NAMES", "load_recipe"]
