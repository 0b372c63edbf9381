"""YAML → plain Python data, remembering where every value was written (`file:line:col`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dapc.errors import RecipeError

KeyPath = tuple[Any, ...]


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of silently keeping the last."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            mark = key_node.start_mark
            raise RecipeError(f"duplicate key {key!r}", f"{mark.name}:{mark.line + 1}:{mark.column + 1}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _location(mark: yaml.Mark) -> str:
    return f"{mark.name}:{mark.line + 1}:{mark.column + 1}"


def _walk(node: yaml.Node, path: KeyPath, positions: dict[KeyPath, str]) -> None:
    positions[path] = _location(node.start_mark)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            _walk(value_node, path + (key,), positions)
            # Unknown-key errors point at the key itself, not its value.
            positions[path + (key, "<key>")] = _location(key_node.start_mark)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, path + (index,), positions)


def load_yaml(path: Path) -> tuple[dict, dict[KeyPath, str]]:
    """Returns the YAML mapping at `path` and a map from key paths to `file:line:col` strings."""
    try:
        stream = path.open(encoding="utf-8")
    except FileNotFoundError as e:
        raise RecipeError("recipe file not found", str(path)) from e
    except OSError as e:
        raise RecipeError(f"cannot read recipe: {e.strerror}", str(path)) from e
    loader = _UniqueKeyLoader(stream)
    loader.name = str(path)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"invalid YAML: {e.problem or e.context}", where) from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"invalid YAML: {e}", str(path)) from e
    finally:
        loader.dispose()
        stream.close()
    if data is None:
        raise RecipeError("recipe is empty", str(path))
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a mapping of sections, got a {type(data).__name__}", f"{path}:1:1")
    positions: dict[KeyPath, str] = {}
    _walk(node, (), positions)
    return data, positions
