"""The memory model against published measured peaks of real GPU training runs (../shared memory_measurements).

Every run a recipe can express is planned with its settings pinned (tests/published_runs.py) and compared with
the figure its source measured, under that source's counter; the table is printed. Runs needing a feature dapc
lacks are listed with the feature. runs.json is held to the issue's goal (median 5%, max 15%, every run that
ran fits); the extra runs, used for no constant in the model, to wider bounds that guard what it achieves.
"""

from __future__ import annotations

import statistics
import sys

import pytest

from tests.conftest import REPO, SHARED

pytestmark = pytest.mark.skipif(not (SHARED / "data" / "memory_measurements").is_dir(),
                                reason="needs ../shared/data/memory_measurements")

sys.path.insert(0, str(REPO / "bench"))


def _print(rows, skipped) -> None:
    for r in rows:
        print(f"{r['id']:42} {r['counter']:9} measured {r['measured_gib']:7.2f} GiB planned {r['planned_gib']:7.2f} "
              f"GiB {r['error']:+7.1%} fits={r['fits']}")
    for run_id, need in skipped:
        print(f"not expressible: {run_id}: needs {need}")


def test_every_published_run_is_planned_or_named_with_the_feature_it_needs():
    from tests.published_runs import NEEDS, SETUPS, runs

    ids = {r["id"] for r in runs()}
    assert ids == set(SETUPS) | set(NEEDS) and not set(SETUPS) & set(NEEDS)


def test_published_runs_json_peaks_are_planned_within_the_models_bounds():
    from memory_published import table

    rows, skipped = table()
    _print(rows, skipped)
    errors = [abs(r["error"]) for r in rows]
    assert all(r["fits"] for r in rows), "a run that really ran is planned as not fitting"
    assert statistics.median(errors) <= 0.05
    assert max(errors) <= 0.15


def test_extra_published_runs_never_fitted_are_planned_within_the_models_bounds():
    from memory_published import table

    rows, skipped = table(extra=True)
    _print(rows, skipped)
    errors = [abs(r["error"]) for r in rows]
    assert all(r["fits"] for r in rows)
    assert statistics.median(errors) <= 0.06  # 4.7% / 17.5% when last changed
    assert max(errors) <= 0.20
