"""`dapc report RUN_DIR` on a real tiny run, finished and still running: the numbers are metrics.jsonl's, the
charts are PNGs, report.md embeds them, and a bad run folder is one located line with exit 2."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dapc.cli import main
from dapc.memory import GIB
from tests.conftest import REPO
from tests.run_support import TINY_STEPS, tiny_run  # noqa: F401 (fixture)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHARTS = ["loss.png", "throughput.png", "memory.png"]


def _report(run_dir: Path, *flags: str):
    return CliRunner().invoke(main, ["report", str(run_dir), *flags])


def _json_report(run_dir: Path) -> dict:
    result = _report(run_dir, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _copy_run(tiny_run, dest: Path, lines: list[str], tail: str = "") -> Path:
    """A run folder beside the real one, holding its plan.json and the metrics lines given (a copied run folder:
    the report reads the metrics.jsonl beside its plan)."""
    dest.mkdir()
    shutil.copy(tiny_run.plan_path, dest / "plan.json")
    (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in lines) + tail)
    return dest


def _check_charts(report: dict, run_dir: Path) -> None:
    folder = run_dir / "report"
    assert report["charts"] == [str(folder / name) for name in CHARTS]
    from PIL import Image

    for name in CHARTS:
        data = (folder / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) < 150_000
        with Image.open(folder / name) as image:
            image.verify()
            assert image.size == (700, 360)
    markdown = (folder / "report.md").read_text()
    assert [m for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)] == CHARTS


def test_report_of_a_finished_run_gives_the_numbers_of_metrics_jsonl(tiny_run):
    steps, (memory,) = tiny_run.records("step"), tiny_run.records("memory")
    plan = tiny_run.plan
    report = _json_report(tiny_run.run_dir)
    last = steps[-1]
    assert (report["status"], report["step"], report["steps"], report["percent"], report["eta_seconds"]) == (
        "finished", TINY_STEPS, TINY_STEPS, 100.0, 0.0)
    assert (report["tokens"], report["loss"], report["lr"], report["tokens_per_second"], report["mfu"]) == (
        last["tokens"], last["loss"], last["lr"], last["tokens_per_second"], last["mfu"])
    assert report["step_seconds"] == statistics.median(r["step_seconds"] for r in steps)
    assert report["median_tokens_per_second"] == statistics.median(r["tokens_per_second"] for r in steps)
    assert report["measured_peak_bytes"] == memory["measured_bytes"]
    assert report["planned_bytes"] == plan["memory"]["per_gpu_bytes"]
    assert report["memory_ratio"] == pytest.approx(memory["ratio"])
    assert report["planned_step_seconds"] == plan["cost"]["step_seconds"]
    assert report["metrics_path"] == str(tiny_run.metrics_path)
    _check_charts(report, tiny_run.run_dir)


def test_report_prints_progress_throughput_and_memory_next_to_the_plan(tiny_run):
    steps, (memory,) = tiny_run.records("step"), tiny_run.records("memory")
    plan = tiny_run.plan
    result = _report(tiny_run.run_dir)
    assert result.exit_code == 0 and result.stderr == ""
    last, median_tps = steps[-1], statistics.median(r["tokens_per_second"] for r in steps)
    planned_tps = plan["batch"]["global_batch_tokens"] / plan["cost"]["step_seconds"]
    lines = result.stdout.splitlines()
    assert lines[:5] == [
        f"run: tiny-cpu ({tiny_run.run_dir}): ddp on 1 × cpu, plan {plan['plan_sha256'][:12]}",
        f"progress: step 4 of 4 (100.0%), finished; {last['tokens']:,} tokens; ETA 0 s",
        f"loss: {last['loss']:.4f} at lr {last['lr']:.3g}",
        f"step time: {statistics.median(r['step_seconds'] for r in steps):.3g} s measured (median of recent steps), "
        f"{plan['cost']['step_seconds']:.3g} s planned",
        f"throughput: {last['tokens_per_second']:,.0f} tokens/s (last step), {median_tps:,.0f} median, "
        f"{planned_tps:,.0f} planned; MFU {100 * last['mfu']:.2f}% (plan assumed 40.00%)",
    ]
    total = next(line for line in lines if line.startswith("│ total"))
    assert [cell.strip() for cell in total.split("│")[1:-1]] == [
        "total", f"{plan['memory']['per_gpu_bytes']['total'] / GIB:.2f}", f"{memory['measured_bytes'] / GIB:.2f}",
        f"{memory['ratio']:.2f}"]
    assert lines[-1] == (f"wrote {tiny_run.run_dir / 'report' / 'report.md'} and loss.png, throughput.png, "
                         "memory.png")


def test_report_of_a_running_run_reads_up_to_the_last_complete_line(tiny_run, tmp_path):
    lines = tiny_run.metrics_path.read_text().splitlines()
    cut = next(i for i, line in enumerate(lines) if (r := json.loads(line))["event"] == "step" and r["step"] == 3)
    run_dir = _copy_run(tiny_run, tmp_path / "running", lines[:cut], tail=lines[cut][:40])  # step 3 half-written
    steps = [json.loads(line) for line in lines[:cut] if json.loads(line)["event"] == "step"]
    report = _json_report(run_dir)
    step_seconds = statistics.median(r["step_seconds"] for r in steps)
    assert (report["status"], report["step"], report["percent"]) == ("running", 2, 50.0)
    assert report["eta_seconds"] == pytest.approx((TINY_STEPS - 2) * step_seconds)
    assert report["tokens_per_second"] == steps[-1]["tokens_per_second"]
    assert report["measured_peak_bytes"] == max(r["peak_memory_bytes"] for r in steps)
    assert report["metrics_path"] == str(run_dir / "metrics.jsonl")
    _check_charts(report, run_dir)


def test_a_just_started_run_reports_step_0_and_exits_0(tiny_run, tmp_path):
    start = tiny_run.metrics_path.read_text().splitlines()[0]
    for name, lines in (("started", [start]), ("opened", [])):
        run_dir = _copy_run(tiny_run, tmp_path / name, lines)
        result = _report(run_dir)
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[1] == (f"progress: step 0 of {TINY_STEPS} (0.0%), starting; 0 tokens; ETA "
                                                 "unknown (no step measured yet)")
        assert not (run_dir / "report" / "loss.png").exists() and (run_dir / "report" / "report.md").is_file()


def test_stops_resumes_and_a_diverged_loss_are_deviations(tiny_run, tmp_path):
    records = tiny_run.records()
    start, steps = records[0], [r for r in records if r["event"] == "step"]
    plan = tiny_run.plan
    folder = str(Path(plan["paths"]["checkpoint_dir"]) / "step-2")
    resumed = {**start, "step": 2, "resumed_from": folder, "world_size": 1, "resumed_world_size": 2}
    again = [{**steps[2], "loss": float("nan"), "tokens_per_second": 7.0}, steps[3]]
    lines = [start, *steps[:3], {"event": "stopped", "step": 3, "checkpoint": folder, "stop_file": "x"},
             {"event": "end"}, resumed, *again, {"event": "end"}]
    run_dir = _copy_run(tiny_run, tmp_path / "resumed", [json.dumps(r) for r in lines])
    report = _json_report(run_dir)
    assert report["status"] == "finished" and report["loss"] == steps[3]["loss"]
    stop_file = plan["runtime"]["preemption"]["stop_file"]
    assert [d for d in report["deviations"] if not d.startswith(("step time", "throughput"))] == [
        f"stopped after step 3 on request ({stop_file})",
        f"resumed after step 2 from {folder}, on 1 ranks (written on 2); step 3 ran twice, the later record counts",
        "loss is not finite from step 3 on",
    ]


@pytest.mark.parametrize("case", ["missing", "a-file", "no-plan", "bad-plan", "no-metrics", "bad-line", "bad-type",
                                  "metrics-dir"])
def test_a_bad_run_folder_is_one_located_line_and_exit_2(tiny_run, tmp_path, case):
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"
    good = tiny_run.metrics_path.read_text().splitlines()
    expected = {
        "missing": f"{run_dir}: no run directory here",
        "a-file": f"{run_dir}: not a directory: give the run's output folder (the one holding plan.json)",
        "no-plan": f"{run_dir}: no plan.json: not a run directory (`dapc render RECIPE -o DIR` writes one)",
        "bad-plan": f"{run_dir / 'plan.json'}: not a plan: no schema_version (write one with `dapc render` or "
                    "`dapc plan --json`)",
        "no-metrics": f"{metrics}: no metrics yet: the trainer writes this file when the run starts (launch.sh, "
                      "job.sbatch)",
        "bad-line": f"{metrics}:2: not a metrics record: not JSON (Expecting value)",
        "bad-type": f"{metrics}:2: not a valid step record: step: Input should be a valid integer",
        "metrics-dir": f"{metrics}: cannot read the metrics: Is a directory",
    }[case]
    if case == "a-file":
        run_dir.write_text("x")
    elif case in ("no-plan", "bad-plan"):
        run_dir.mkdir()
        if case == "bad-plan":
            (run_dir / "plan.json").write_text("{}")
    elif case != "missing":
        from dapc.compile import compile_recipe

        run_dir.mkdir()
        compiled = compile_recipe(REPO / "examples" / "tiny" / "recipe.yaml", output=str(run_dir)).plan
        (run_dir / "plan.json").write_text(compiled.text())
        if case == "bad-line":
            metrics.write_text(f"{good[0]}\nnot json\n{good[1]}\n")
        elif case == "bad-type":
            metrics.write_text(good[0] + "\n" + json.dumps({**json.loads(good[1]), "step": True}) + "\n")
        elif case == "metrics-dir":
            metrics.mkdir()
    result = _report(run_dir)
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", f"error: {expected}\n")


def test_report_never_imports_torch(tiny_run):
    code = ("import sys\nfrom dapc.cli import main\n"
            "try:\n    main(standalone_mode=False)\nfinally:\n"
            "    heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules)\n"
            "    print('HEAVY', heavy, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code, "report", str(tiny_run.run_dir), "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr.splitlines()[-1] == "HEAVY []", done.stderr


def _readme_section() -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index("## Watching a run"):].split("\n## ", 1)[0]


def test_readme_reports_the_run_the_readme_example_makes_and_its_logging_block_is_a_recipe_section():
    from dapc.recipe.schema import LoggingSection
    from tests.test_readme_example import _readme_command

    run_dir = re.search(r"\s-o\s+(\S+)", _readme_command()).group(1)
    section = _readme_section()
    commands = re.findall(r"^dapc report (\S+)", section, flags=re.M)
    assert commands and set(commands) == {run_dir}
    (block,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    LoggingSection.model_validate(yaml.safe_load(block)["logging"])
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section):
        data = (REPO / image).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) < 150_000
