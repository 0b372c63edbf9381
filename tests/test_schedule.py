"""The learning-rate schedules as plan.json states them and the runtime applies them (dapc.schedule, one function)."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from dapc.cli import main
from dapc.plan_schema import Schedule
from dapc.schedule import key_points, lr_at


def _schedule(kind: str, **fields) -> Schedule:
    base = {"kind": kind, "peak_lr": 1e-3, "min_lr": 1e-4, "warmup_start_lr": 0.0, "warmup_steps": 10,
            "decay_steps": 20, "total_steps": 100, "points": ()}
    return Schedule.model_validate({**base, **fields})


def test_warmup_reaches_the_peak_at_its_last_step_and_rewarming_starts_from_the_given_lr():
    s = _schedule("cosine", warmup_start_lr=3e-5, decay_steps=90)
    assert lr_at(s, 0) == pytest.approx(3e-5 + (1e-3 - 3e-5) / 10)
    assert lr_at(s, 9) == pytest.approx(1e-3)
    assert lr_at(_schedule("cosine", decay_steps=90), 0) == pytest.approx(1e-4)  # from 0: a tenth of the peak


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_steps_to_the_floor():
    s = _schedule("wsd")
    assert [lr_at(s, k) for k in (10, 50, 80)] == [1e-3] * 3
    assert lr_at(s, 99) == pytest.approx(1e-4)
    assert lr_at(s, 80 + 19 // 2) == pytest.approx(1e-3 - 0.9e-3 * (9 / 19))
    assert key_points(s) == ((0, pytest.approx(1e-4)), (9, pytest.approx(1e-3)), (80, pytest.approx(1e-3)),
                             (99, pytest.approx(1e-4)))


def test_constant_with_cooldown_falls_as_one_minus_sqrt():
    s = _schedule("constant-with-cooldown")
    progress = 5 / 19
    assert lr_at(s, 85) == pytest.approx(1e-4 + 0.9e-3 * (1 - math.sqrt(progress)))
    assert lr_at(s, 99) == pytest.approx(1e-4)


def test_cosine_and_linear_reach_the_floor_at_the_last_step_and_constant_never_decays():
    for kind in ("cosine", "linear"):
        s = _schedule(kind, decay_steps=90)
        assert lr_at(s, 99) == pytest.approx(1e-4) and lr_at(s, 10) == pytest.approx(1e-3)
    c = _schedule("constant", min_lr=1e-3, decay_steps=0)
    assert all(lr_at(c, k) == 1e-3 for k in range(10, 100))


def test_the_plan_prints_the_key_points_of_a_wsd_schedule(minimal_recipe):
    recipe = minimal_recipe({"training": {"schedule": "wsd", "decay_fraction": 0.25, "warmup_fraction": 0.1,
                                          "warmup_start_lr": 1e-6, "lr": 2e-5}})
    result = CliRunner().invoke(main, ["plan", str(recipe), "--json"])
    assert result.exit_code == 0, result.stderr
    s = json.loads(result.stdout)["schedule"]
    steps = s["total_steps"]
    assert s["kind"] == "wsd" and s["decay_steps"] == round(0.25 * steps) and s["warmup_start_lr"] == 1e-6
    assert [p[0] for p in s["points"]] == [0, s["warmup_steps"] - 1, steps - s["decay_steps"], steps - 1]
    text = CliRunner().invoke(main, ["plan", str(recipe)]).stdout
    assert "schedule: wsd (re-warming from lr 1e-06): step 0 lr" in " ".join(text.split())


def test_a_decay_longer_than_the_run_after_warmup_is_a_located_error(minimal_recipe):
    recipe = minimal_recipe({"training": {"schedule": "wsd", "decay_fraction": 0.95, "warmup_fraction": 0.1}})
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2 and "exceed the whole run" in result.stderr and "Traceback" not in result.stderr
