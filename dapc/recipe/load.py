"""Load a recipe: YAML with positions, `base:` inheritance, `--set` overrides, typed validation (`dapc.typed`).

Every error names where the offending value was written: `file:line:col`, or the `--set` flag.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dapc.errors import RecipeError
from dapc.recipe.schema import Recipe
from dapc.recipe.yaml_positions import KeyPath, load_yaml
from dapc.typed import Model, ValidationError

_MAX_BASE_DEPTH = 16


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe and where each of its values came from."""

    recipe: Recipe
    path: Path
    positions: dict[KeyPath, str]

    def locate(self, *key_path: Any) -> str:
        """Returns `file:line:col` (or `--set ...`) of the deepest written prefix of `key_path`."""
        for end in range(len(key_path), -1, -1):
            where = self.positions.get(tuple(key_path[:end]))
            if where:
                return where
        return str(self.path)

    def origin_dir(self, *key_path: Any) -> Path:
        """Returns the directory that relative paths at `key_path` resolve against: the declaring file's."""
        where = self.locate(*key_path)
        if where.startswith("--set"):
            return Path.cwd()
        return Path(where.rsplit(":", 2)[0]).resolve().parent


def _deep_merge(base: dict, child: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _drop_positions_under(positions: dict[KeyPath, str], prefix: KeyPath) -> None:
    for key in [k for k in positions if k[: len(prefix)] == prefix and len(k) > len(prefix)]:
        del positions[key]


def _load_with_bases(path: Path, chain: tuple[Path, ...]) -> tuple[dict, dict[KeyPath, str]]:
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte
        raise RecipeError(f"cannot read recipe: {getattr(e, 'strerror', None) or e}", str(path)) from e
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in chain + (resolved,))
        raise RecipeError(f"`base:` inheritance forms a cycle: {cycle}", str(path))
    if len(chain) >= _MAX_BASE_DEPTH:
        raise RecipeError(f"`base:` chain deeper than {_MAX_BASE_DEPTH} files", str(path))
    data, positions = load_yaml(path)
    base_ref = data.pop("base", None)
    if base_ref is None:
        return data, positions
    base_where = positions[("base",)]
    if not isinstance(base_ref, str) or not base_ref:
        raise RecipeError("`base:` must be a path to another recipe file", base_where)
    base_path = (path.parent / base_ref) if not Path(base_ref).is_absolute() else Path(base_ref)
    if not base_path.is_file():
        raise RecipeError(f"base recipe {base_ref!r} not found (looked for {base_path})", base_where)
    base_data, base_positions = _load_with_bases(base_path, chain + (resolved,))
    merged_positions = dict(base_positions)
    for key_path in positions:
        # A child value that is not a section replaces the base's whole subtree, positions included.
        if key_path and key_path[-1] != "<key>" and not isinstance(data_at(data, key_path), dict):
            _drop_positions_under(merged_positions, key_path)
    merged_positions.update(positions)
    merged_positions.pop(("base",), None)
    merged_positions.pop(("base", "<key>"), None)
    return _deep_merge(base_data, data), merged_positions


def data_at(data: Any, key_path: KeyPath) -> Any:
    """Returns the value at `key_path` inside nested dicts/lists, or None where the path does not exist."""
    for key in key_path:
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data):
            data = data[key]
        else:
            return None
    return data


def _apply_override(data: dict, positions: dict[KeyPath, str], override: str) -> None:
    where = f"--set {override}"
    key_text, sep, value_text = override.partition("=")
    keys = tuple(key_text.strip().split("."))
    if not sep or not all(keys):
        raise RecipeError("expected --set key.path=value, e.g. --set hardware.nodes=2", where)
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"value is not valid YAML: {e}", where) from e
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"{'.'.join(keys[: depth + 1])} is a value, not a section", where)
        node = child
    node[keys[-1]] = value
    _drop_positions_under(positions, keys)
    positions[keys] = where
    positions[keys + ("<key>",)] = where


def _model_at(path: KeyPath) -> type[Model] | None:
    model: Any = Recipe
    for key in path:
        if isinstance(key, int):
            continue
        field = model.model_fields.get(key) if isinstance(model, type) and issubclass(model, Model) else None
        if field is None:
            return None
        model = _first_model(field.annotation)
    return model if isinstance(model, type) and issubclass(model, Model) else None


def _first_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, Model):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _field_path(loc: tuple, data: dict) -> KeyPath:
    """Keeps the leading part of an error location that names written keys, and the first missing one."""
    path: list[Any] = []
    node: Any = data
    for key in loc:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        elif isinstance(node, dict):
            path.append(key)  # a missing field: name it, stop descending
            break
        else:
            break
        path.append(key)
    return tuple(path)


def _dotted(path: KeyPath) -> str:
    return ".".join(f"[{k}]" if isinstance(k, int) else str(k) for k in path).replace(".[", "[") or "recipe"


def _describe(errors: list[dict], data: dict, positions: dict[KeyPath, str], fallback: str) -> RecipeError:
    first = errors[0]
    path = _field_path(first["loc"], data)

    def locate(key_path: KeyPath) -> str:
        return next((positions[key_path[:end]] for end in range(len(key_path), -1, -1) if key_path[:end] in positions), fallback)

    kind = first["type"]
    if kind == "extra_forbidden":
        parent, key = path[:-1], path[-1]
        model = _model_at(parent)
        known = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"
        where = positions.get(path + ("<key>",), locate(path))
        return RecipeError(f"unknown key {key!r} in {_dotted(parent)}{hint}", where)
    if kind == "missing":
        return RecipeError(f"{_dotted(path)}: required field is missing", locate(path[:-1]))
    same_field = [e for e in errors if _field_path(e["loc"], data) == path]
    reasons = "; or ".join(dict.fromkeys(e["msg"][0].lower() + e["msg"][1:] for e in same_field))
    got = data_at(data, path)
    shown = f" (got {got!r})" if got is not None and not isinstance(got, (dict, list)) else ""
    return RecipeError(f"{_dotted(path)}: {reasons}{shown}", locate(path))


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> LoadedRecipe:
    """Returns the validated recipe at `path` after `base:` inheritance and `--set key.path=value` overrides.

    Raises RecipeError (exit 2) naming `file:line:col` for the first problem found.
    """
    path = Path(path)
    data, positions = _load_with_bases(path, ())
    for override in overrides:
        _apply_override(data, positions, override)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise _describe(e.errors(), data, positions, str(path)) from e
    return LoadedRecipe(recipe=recipe, path=path, positions=positions)
