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


MAX_RECIPE_BYTES = 1024 * 1024  # a recipe is a page of YAML; anything this large is not one
MAX_NODES = 100_000  # YAML nodes after alias expansion: bounds an alias bomb
MAX_DEPTH = 64  # nesting: bounds recursion in composing, constructing and walking


def _read_bytes(path: Path) -> bytes:
    try:
        if not path.is_file():
            raise RecipeError("recipe file not found" if not path.exists() else "not a regular file", str(path))
        with path.open("rb") as handle:
            data = handle.read(MAX_RECIPE_BYTES + 1)
    except RecipeError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: a symlink loop in Path.resolve
        raise RecipeError(f"cannot read recipe: {getattr(e, 'strerror', None) or e}", str(path)) from e
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe larger than {MAX_RECIPE_BYTES // 1024} KiB", str(path))
    return data


def _text(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise RecipeError(f"not UTF-8 text (byte 0x{data[e.start]:02x})", f"{path}:{line}:{column}") from None


def _check_shape(node: yaml.Node, path: Path) -> None:
    """Refuses alias bombs (too many nodes once aliases are followed), deep nesting and non-scalar keys."""
    count = 0
    stack = [(node, 1)]
    while stack:
        current, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise RecipeError(f"recipe expands to more than {MAX_NODES:,} YAML nodes (aliases?)", str(path))
        if depth > MAX_DEPTH:
            raise RecipeError(f"recipe nested deeper than {MAX_DEPTH} levels", _location(current.start_mark))
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                if not isinstance(key, yaml.ScalarNode):
                    raise RecipeError("a mapping key must be a plain value, not a list or mapping",
                                      _location(key.start_mark))
                stack.append((value, depth + 1))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend((item, depth + 1) for item in current.value)


def load_yaml(path: Path) -> tuple[dict, dict[KeyPath, str]]:
    """Returns the YAML mapping at `path` and a map from key paths to `file:line:col` strings.

    Bounded work on hostile input: size, node count after aliases and depth are capped; every failure is a
    RecipeError naming the place."""
    text = _text(path, _read_bytes(path))
    loader = None
    try:
        loader = _UniqueKeyLoader(text)  # checks the characters first
        loader.name = str(path)
        node = loader.get_single_node()
        if node is not None:
            _check_shape(node, path)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"invalid YAML: {e.problem or e.context}", where) from e
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise RecipeError(f"invalid YAML: character #x{e.character:04x} is not allowed", f"{path}:{line}:{column}") from e
    except yaml.YAMLError as e:
        raise RecipeError(f"invalid YAML: {' '.join(str(e).split())}", str(path)) from e
    except RecursionError as e:
        raise RecipeError("recipe nested too deeply", str(path)) from e
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        raise RecipeError("recipe is empty", str(path))
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a mapping of sections, got a {type(data).__name__}", f"{path}:1:1")
    positions: dict[KeyPath, str] = {}
    _walk(node, (), positions)
    return data, positions
