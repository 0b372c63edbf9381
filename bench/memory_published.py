"""Plans every published GPU run a recipe can express and prints planned vs measured per-GPU peak memory.

    python bench/memory_published.py            (needs ../shared/data/memory_measurements)

The same table is asserted by tests/test_memory_published.py.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.published_runs import (  # noqa: E402
    EXTRA_RUNS,
    EXTRA_SETUPS,
    GIB,
    NEEDS,
    SETUPS,
    corpus_dir,
    measured_bytes,
    overrides,
    predicted_bytes,
    runs,
)


def table(extra: bool = False) -> tuple[list[dict], list[tuple[str, str]]]:
    """Returns (one row per expressible run, (id, feature needed) for the rest), of runs.json or of the extra set."""
    import yaml

    from dapc.compile import compile_recipe

    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = corpus_dir(Path(tmp))
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"name": "published", "model": {"source": "meta-llama/Llama-3.1-8B"},
                                          "data": {"paths": [str(corpus)]}, "training": {"tokens": 1_000_000}}))
        for run in EXTRA_RUNS if extra else runs():
            setup = (EXTRA_SETUPS if extra else SETUPS).get(run["id"])
            if setup is None:
                skipped.append((run["id"], NEEDS[run["id"]]))
                continue
            plan = compile_recipe(recipe, tuple(overrides(run, setup))).plan
            predicted, measured = predicted_bytes(plan, setup.counter), measured_bytes(run)
            rows.append({"id": run["id"], "counter": setup.counter, "measured_gib": measured / GIB,
                         "planned_gib": predicted / GIB, "error": predicted / measured - 1, "fits": plan.memory.fits,
                         "plan": plan})
    return rows, skipped


def main() -> int:
    for extra in (False, True):
        print("extra published runs (a check: used for no constant)" if extra else "runs.json")
        _print(*table(extra))
    return 0


def _print(rows, skipped) -> None:
    print(f"{'run':42} {'counter':9} {'measured':>9} {'planned':>9} {'error':>7}  fits")
    for r in rows:
        print(f"{r['id']:42} {r['counter']:9} {r['measured_gib']:9.2f} {r['planned_gib']:9.2f} {r['error']:+7.1%}  "
              f"{r['fits']}")
    errors = [abs(r["error"]) for r in rows]
    print(f"median |error| {statistics.median(errors):.1%}, max {max(errors):.1%}, over {len(rows)} runs")
    for run_id, need in skipped:
        print(f"not expressible: {run_id}: needs {need}")


if __name__ == "__main__":
    sys.exit(main())
