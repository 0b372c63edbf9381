"""End to end on the CPU: `dapc render` the tiny example, then run the rendered launch.sh (prepare → torchrun with
2 processes → checkpoint → Hugging Face export → evaluation), and the same job through a real Slurm cluster.

Each run also checks the memory model against the run itself: the trainer logs the measured peak (the plan's
counter, cpu.vm_hwm here) next to the plan's estimate, and they must agree within 15%.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from dapc.cli import main
from tests.conftest import REPO, SHARED
from tests.train_support import kill_tree

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


def _launch_env() -> dict[str, str]:
    with socket.socket() as s:  # a fresh rendezvous port per launch: a killed run's may linger
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**os.environ, "MASTER_PORT": str(port)}


def _launch(out: Path) -> str:
    result = subprocess.run(["bash", str(out / "launch.sh")], cwd=out.parent, capture_output=True, text=True,
                            timeout=600, env=_launch_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in _events(out, "step")}  # a step run twice: the later counts


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> tuple[Path, dict, str]:
    """The tiny example as shipped (FSDP2, with its evaluation step), run once through launch.sh."""
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    plan = _render(out)
    return out, plan, _launch(out)


def test_rendered_launch_sh_trains_exports_evaluates_and_fits_the_memory_estimate(fsdp2_run, tmp_path):
    out, plan, log = fsdp2_run
    assert plan["strategy"]["name"] == "fsdp2-full"
    assert "fsdp2-full on 2 × cpu: 12 steps of 1,024 tokens" in log
    _check_trained(out, plan)
    results = json.loads((out / "eval" / "results.json").read_text())
    assert (out / "eval" / "comparison.md").exists() and (out / "eval" / "comparison.png").exists()
    assert set(results["models"]) == {"model", "compare_to"}
    assert results["models"]["model"]["path"] == str(out / "export")
    assert results["models"]["compare_to"]["path"] == str(out / "eval" / "base-model")
    # The same comparison through the CLI, on any two model directories.
    fixture = REPO / "tests" / "fixtures" / "benchmarks" / "seceval.json"
    result = CliRunner().invoke(main, ["eval", "--model", str(out / "export"), "--compare-to",
                                       str(out / "eval" / "base-model"), "--benchmark", f"seceval={fixture}",
                                       "--k-shot", "1", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["comparison.md", "comparison.png",
                                                                       "results.json"]


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_rendered_launch_sh_runs_deepspeed_and_fits_the_memory_estimate(tmp_path, strategy):
    out = tmp_path / "run"
    plan = _render(out, f"strategy={strategy}", "eval.benchmarks=[]")
    assert f"{strategy} on 2 × cpu: 12 steps of 1,024 tokens" in _launch(out)
    _check_trained(out, plan)


def test_kill_9_then_relaunching_launch_sh_resumes_with_identical_losses(fsdp2_run, tmp_path):
    reference, _, _ = fsdp2_run
    out = tmp_path / "run"
    _render(out, "eval.benchmarks=[]", "checkpoint.export_hf=false")
    step_4 = out / "checkpoints" / "step-4" / "meta.json"
    with open(tmp_path / "killed.log", "w") as log:
        launch = subprocess.Popen(["bash", str(out / "launch.sh")], cwd=tmp_path, stdout=log, stderr=log,
                                  start_new_session=True, env=_launch_env())
        try:
            deadline = time.monotonic() + 300
            while not step_4.exists():
                assert launch.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no step-4 checkpoint within 300 s"
                time.sleep(0.05)
        finally:
            kill_tree(launch.pid)  # bash, torchrun and both ranks, mid-step
            launch.wait()
    assert max(_losses(out)) < 12, "the run finished before it was killed"
    _launch(out)
    start = _events(out, "start")[-1]
    assert start["step"] >= 4 and Path(start["resumed_from"]).name == f"step-{start['step']}"
    expected, resumed = _losses(reference), _losses(out)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(start["step"] + 1, 13):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), (step, resumed[step], expected[step])


def test_slurm_job_preempted_by_its_signal_checkpoints_requeues_and_ends_with_the_uninterrupted_losses(
        fsdp2_run, tmp_path, slurm_cluster):
    """The tiny run as a real `sbatch job.sbatch` on 2 emulated nodes × 1 process (rendezvous at NodeAddr). After
    its step-4 checkpoint the batch script gets SIGUSR1, as `--signal=B:USR1@…` delivers it before the time limit:
    the trainer checkpoints after its current step and exits, the job requeues itself, and the second run resumes
    from that checkpoint and finishes with the losses of the uninterrupted launch.sh run (same world size)."""
    reference, _, _ = fsdp2_run
    out = tmp_path / "run"
    plan = _render(out, "hardware.nodes=2", "hardware.gpus_per_node=1", "launch.slurm.cpus_per_task=1",
                   "eval.benchmarks=[]")
    sbatch = (out / "job.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@60\n#SBATCH --requeue\n" in sbatch
    job_id = slurm_cluster.submit(out / "job.sbatch", cwd=tmp_path)
    step_4 = out / "checkpoints" / "step-4" / "meta.json"
    deadline = time.monotonic() + 300
    while not step_4.exists():
        info = slurm_cluster.job_info(job_id) or {}
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), (info, slurm_cluster.logs())
        assert time.monotonic() < deadline, "no step-4 checkpoint within 300 s"
        time.sleep(0.05)
    signalled = slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    assert signalled.returncode == 0, signalled.stderr
    job = slurm_cluster.wait(job_id, timeout_s=600)
    log = job.output()
    assert job.ok, f"{job.state} {job.exit_code}\n{log[-3000:]}\n{slurm_cluster.logs()}"
    assert job.info.get("Restarts") == "1", job.info
    assert "checkpointed before the time limit; requeueing job" in log
    stopped = _events(out, "stopped")
    assert len(stopped) == 1 and 4 <= stopped[0]["step"] < 12, stopped
    resumed = _events(out, "start")[-1]
    assert resumed["step"] == stopped[0]["step"]
    assert Path(resumed["resumed_from"]).name == f"step-{stopped[0]['step']}"
    _check_trained(out, plan)
    expected, got = _losses(reference), _losses(out)
    for step in range(1, 13):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), (step, got[step], expected[step])

