"""End to end on the CPU: `dapc render` the tiny example, then run the rendered launch.sh (prepare → torchrun with
2 processes → checkpoint → Hugging Face export → evaluation), and the same job through a real Slurm cluster.

Each run also checks the memory model against the run itself: the trainer logs the measured peak (the plan's
counter, cpu.vm_hwm here) next to the plan's estimate, and they must agree within 15%.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from dapc.cli import main
from tests.conftest import REPO, SHARED

CORPUS = SHARED / "data" / "corpus"
MEMORY_TOLERANCE = 0.15


def _render(out: Path, *overrides: str) -> dict:
    args = ["render", str(REPO / "examples/tiny/recipe.yaml"), "-o", str(out), "--set",
            f"data.paths=[{json.dumps(str(CORPUS))}]"]
    for override in overrides:
        args += ["--set", override]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "plan.json").read_text())


def _events(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == kind]


def _check_trained(out: Path, plan: dict) -> None:
    steps = _events(out, "step")
    assert [s["step"] for s in steps] == list(range(1, plan["cost"]["steps"] + 1))
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    memory = _events(out, "memory")[-1]
    assert memory["counter"] == plan["memory"]["counter"] == "cpu.vm_hwm"
    assert memory["estimated_bytes"] == plan["memory"]["per_gpu_bytes"]["total"]
    assert abs(memory["measured_bytes"] / memory["estimated_bytes"] - 1) <= MEMORY_TOLERANCE, memory
    model = AutoModelForCausalLM.from_pretrained(out / "export")
    tokenizer = AutoTokenizer.from_pretrained(out / "export")
    prompt = tokenizer("Zero trust architecture", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5


@pytest.mark.parametrize("strategy", ["fsdp2-full", "zero2", "zero3"])
def test_rendered_launch_sh_trains_exports_and_fits_the_memory_estimate(tmp_path, strategy):
    out = tmp_path / "run"
    evaluate = strategy == "fsdp2-full"  # the evaluation step once is enough
    plan = _render(out, f"strategy={strategy}", *(() if evaluate else ("eval.benchmarks=[]",)))
    result = subprocess.run(["bash", str(out / "launch.sh")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{strategy} on 2 × cpu: 12 steps of 1,024 tokens" in result.stdout + result.stderr
    _check_trained(out, plan)
    if evaluate:
        results = json.loads((out / "eval" / "results.json").read_text())
        assert (out / "eval" / "comparison.md").exists() and (out / "eval" / "comparison.png").exists()
        assert set(results["models"]) == {"model", "compare_to"}
        assert results["models"]["model"]["path"] == str(out / "export")
        assert results["models"]["compare_to"]["path"] == str(out / "eval" / "base-model")


def test_tiny_example_runs_as_a_slurm_job_on_two_nodes(tmp_path, slurm_cluster):
    """The same run as a real `sbatch job.sbatch`: 2 emulated nodes × 1 process, rendezvous at NodeAddr."""
    out = tmp_path / "run"
    plan = _render(out, "hardware.nodes=2", "hardware.gpus_per_node=1", "launch.slurm.cpus_per_task=1",
                   "eval.benchmarks=[]")
    job = slurm_cluster.submit_and_wait(out / "job.sbatch", cwd=tmp_path, timeout_s=600)
    log = job.output()
    assert job.ok, f"{job.state} {job.exit_code}\n{log[-3000:]}\n{slurm_cluster.logs()}"
    assert Path(job.stdout_path) == out / f"slurm-{job.job_id}.out"
    assert "fsdp2-full on 2 × cpu: 12 steps of 1,024 tokens" in log
    _check_trained(out, plan)
