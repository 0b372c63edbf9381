"""The measured peak (the plan's `memory.counter`, `cpu.vm_hwm` here) next to the plan's estimate.

The trainer logs a `memory` record with the whole run's peak VmHWM per rank; this test checks that record
against the plan, for the one-process DDP run (FSDP2, ZeRO-2 and ZeRO-3 on two processes are checked the same
way, through the rendered launch.sh, in tests/test_e2e_launch.py). Like there, measured and estimated must
agree within 15%; `pytest -s` prints the ratio.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.memory_probe import vm_hwm_bytes
from tests.train_support import compile_plan, read_plan, records, train

MIB = 1024**2


@pytest.mark.parametrize(("strategy", "nproc"), [("ddp", 1)])
def test_measured_peak_memory_is_logged_next_to_the_plan_estimate(strategy: str, nproc: int, prepared_dir: Path,
                                                                  tmp_path: Path):
    overrides = [f"strategy={strategy}", "checkpoint.export_hf=false"]
    if nproc == 1:
        overrides.append("hardware.gpus_per_node=1")
    plan_path = compile_plan(tmp_path, prepared_dir, *overrides)
    plan = read_plan(plan_path)
    assert plan["batch"]["world_size"] == nproc and plan["memory"]["counter"] == "cpu.vm_hwm"
    train(plan_path, nproc=nproc)

    (memory,) = records(plan_path, "memory")
    estimated = plan["memory"]["per_gpu_bytes"]["total"]
    assert (memory["counter"], memory["estimated_bytes"], memory["world_size"]) == ("cpu.vm_hwm", estimated, nproc)
    assert len(memory["per_rank_bytes"]) == nproc and memory["measured_bytes"] == max(memory["per_rank_bytes"])
    assert memory["ratio"] == pytest.approx(memory["measured_bytes"] / estimated)
    step_peaks = [r["peak_memory_bytes"] for r in records(plan_path, "step")]
    assert step_peaks == sorted(step_peaks) and step_peaks[-1] <= memory["measured_bytes"]  # a high-water mark
    assert abs(memory["ratio"] - 1) <= 0.15, memory
    measured = memory["measured_bytes"]
    print(f"\n{strategy:>10} × {nproc}: measured {measured:,} B ({measured / MIB:,.0f} MiB), "
          f"estimated {estimated:,} B ({estimated / MIB:,.0f} MiB), ratio {memory['ratio']:.3f}")


def test_vm_hwm_reads_the_status_line_in_bytes(tmp_path: Path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t  123456 kB\nVmRSS:\t  100 kB\n")
    assert vm_hwm_bytes(status) == 123456 * 1024
    assert vm_hwm_bytes() > 10 * MIB  # this process
