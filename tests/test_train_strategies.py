"""The remaining strategy names train the tiny example, 2 processes each, without export.

In fp32 every strategy that starts from the same seeded weights follows FSDP2's losses: HSDP (a
replicate × shard mesh), FSDP2 with CPUOffloadPolicy, ZeRO-1, and ZeRO-2 with optimizer states on the CPU
(DeepSpeedCPUAdam, a C++ op built on first use: about 40 s once per machine). ZeRO-3 builds under
`deepspeed.zero.Init`, whose initialization draws differently, so its full-offload variant only has to learn.
About 1.5 minutes once the op is built.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train_support import compile_plan, losses, read_plan, records, train

NO_EXPORT = "checkpoint.export_hf=false"


@pytest.fixture(scope="module")
def fsdp2_losses(prepared_dir: Path, tmp_path_factory) -> dict[int, float]:
    plan_path = compile_plan(tmp_path_factory.mktemp("fsdp2"), prepared_dir, NO_EXPORT)
    train(plan_path, nproc=2)
    return losses(plan_path)


@pytest.mark.parametrize(
    ("strategy", "overrides"),
    [
        ("fsdp2-hybrid", ("hardware.nodes=2", "hardware.gpus_per_node=1")),  # mesh [2, 1]: replicate × shard
        ("fsdp2-offload-cpu", ()),
        ("zero1", ()),
        ("zero2-offload-cpu", ()),
    ],
)
def test_strategy_follows_fsdp2_losses(strategy: str, overrides: tuple[str, ...], fsdp2_losses: dict[int, float],
                                       prepared_dir: Path, tmp_path: Path):
    plan_path = compile_plan(tmp_path, prepared_dir, NO_EXPORT, f"strategy={strategy}", *overrides)
    assert read_plan(plan_path)["strategy"]["name"] == strategy
    train(plan_path, nproc=2)
    got = losses(plan_path)
    assert sorted(got) == sorted(fsdp2_losses)
    for step, loss in got.items():
        assert loss == pytest.approx(fsdp2_losses[step], rel=1e-5), (step, loss, fsdp2_losses[step])


def test_zero3_with_parameters_and_optimizer_on_the_cpu_learns(prepared_dir: Path, tmp_path: Path):
    plan_path = compile_plan(tmp_path, prepared_dir, NO_EXPORT, "strategy=zero3-offload-cpu-full")
    deepspeed = read_plan(plan_path)["runtime"]["deepspeed"]["zero_optimization"]
    assert (deepspeed["offload_param"]["device"], deepspeed["offload_optimizer"]["device"]) == ("cpu", "cpu")
    train(plan_path, nproc=2)
    got = losses(plan_path)
    assert got[12] < got[1] - 0.5, got
    assert records(plan_path, "start")[0]["trainable_params"] == read_plan(plan_path)["method"]["trainable_params"]
