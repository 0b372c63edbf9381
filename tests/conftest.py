"""Shared fixtures: the repository, the shared data beside it, and a minimal recipe to start from."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

MINIMAL_RECIPE = {
    "name": "minimal",
    "model": {"source": "meta-llama/Llama-3.1-8B"},
    "data": {"paths": ["corpus"], "seq_len": 4096},
    "training": {"tokens": 1_000_000_000, "global_batch_tokens": 1_048_576},
    "hardware": {"gpu": "H100-SXM-80GB", "gpus_per_node": 8, "nodes": 1},
}


@pytest.fixture
def minimal_recipe(tmp_path: Path):
    """Returns a function that writes MINIMAL_RECIPE deep-merged with `changes` and returns its path."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("Zero trust architecture.\n" * 40)

    def write(changes: dict | None = None, text: str | None = None, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
            return path
        recipe = _merge(MINIMAL_RECIPE, changes or {})
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


def _merge(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


pytest_plugins = ["tests.slurm_cluster", "tests.train_support"]
