"""Weighted corpus sources with general-text replay: the budget arithmetic, the mixture sampler (shares,
determinism, exact resume, any world size), and a two-source recipe planned, prepared and trained, killed with
-9 and resumed with the same stream."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from dapc.cli import main
from dapc.compile import compile_recipe
from dapc.corpus import CorpusFile
from dapc.sources import SourceFiles, plan_sources
from runtime.data import MixtureSampler
from tests.conftest import REPO
from tests.train_support import TINY_RECIPE, launch_command, records, run_env, train, train_killed_once

TINY = REPO / "examples" / "tiny"


def _source(name: str, n_bytes: int, role: str = "domain", **amount) -> SourceFiles:
    return SourceFiles(name, role, "text", None, (CorpusFile(f"/{name}.txt", n_bytes),), **amount)


def _tokens(planned) -> dict[str, int]:
    return {p.source.name: p.planned_tokens for p in planned}


def test_weights_divide_the_budget_and_replay_takes_its_share_of_all_tokens():
    total, planned = plan_sources((_source("a", 4000, weight=3), _source("b", 4000, weight=1),
                                   _source("g", 10**6, "replay", share=0.2)), 10_000, 1.0, 0.25)
    assert total == 10_000 and _tokens(planned) == {"a": 6000, "b": 2000, "g": 2000}
    assert [round(p.share, 6) for p in planned] == [0.6, 0.2, 0.2]
    assert [p.epochs for p in planned] == [6.0, 2.0, 2000 / 250_000]


def test_without_a_budget_epochs_and_tokens_set_it_and_replay_adds_its_share_on_top():
    # a: 2 passes over 1,000 tokens; b: 500 tokens; w: weighted, 1 pass (training.epochs) over its 1,000 tokens.
    total, planned = plan_sources((_source("a", 4000, epochs=2), _source("b", 4000, tokens=500),
                                   _source("w", 4000), _source("g", 10**6, "replay", share=0.25)), None, 1.0, 0.25)
    assert _tokens(planned) == {"a": 2000, "b": 500, "w": 1000, "g": 1167} and total == 4667


def test_amounts_alone_under_a_budget_become_proportions():
    total, planned = plan_sources((_source("a", 4000, epochs=3), _source("b", 4000, epochs=1)), 8000, 1.0, 0.25)
    assert total == 8000 and _tokens(planned) == {"a": 6000, "b": 2000}


def test_fixed_amounts_over_the_budget_are_a_located_error(minimal_recipe):
    recipe = minimal_recipe({"data": {"paths": [], "sources": [
        {"name": "big", "paths": ["corpus"], "tokens": 10**9}, {"name": "w", "paths": ["corpus"]}]},
        "training": {"tokens": 10**6}})
    result = CliRunner().invoke(main, ["plan", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "leave nothing of training.tokens 1,000,000 for the weighted sources" in result.stderr
    assert result.stderr.startswith(f"error: {recipe}:")


@pytest.mark.parametrize("data, message", [
    ({"sources": [{"name": "a", "paths": ["x"]}]}, "exactly one of them"),
    ({"paths": [], "sources": [{"name": "a", "paths": ["x"], "weight": 1, "epochs": 2}]},
     "set one of weight, tokens or epochs, not weight and epochs"),
    ({"paths": [], "sources": [{"name": "a", "paths": ["x"]}], "replay": {"name": "a", "paths": ["y"], "share": 0.1}},
     "source name 'a' is used twice"),
    ({"replay": {"paths": ["y"], "share": 1.5}}, "less than 1"),
])
def test_bad_source_settings_exit_2_with_one_located_line(minimal_recipe, data, message):
    recipe = minimal_recipe({"data": data})
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr and result.stderr.startswith(f"error: {recipe}:")
    assert len(result.stderr.strip().splitlines()) == 1


def _global_steps(world: int, micro: int, steps: int, state: dict | None = None, sizes=(50, 7, 20),
                  shares=(0.6, 0.15, 0.25), global_batch: int = 24) -> tuple[list[list[int]], dict]:
    samplers = [MixtureSampler(sizes, shares, r, world, 7, micro, global_batch) for r in range(world)]
    if state is not None:
        for s in samplers:
            s.load_state_dict(state)
    streams = [iter(s) for s in samplers]
    out = []
    for _ in range(steps):
        step = []
        for _ in range(global_batch // (world * micro)):
            for stream in streams:
                step += next(stream)
        out.append(step)
    return out, samplers[0].state_dict()


def test_mixture_draws_each_source_at_its_share_and_runs_through_each_sources_epochs():
    steps, _ = _global_steps(1, 4, 50)
    drawn = [i for step in steps for i in step]
    offsets = (0, 50, 57, 77)
    counts = [sum(offsets[s] <= i < offsets[s + 1] for i in drawn) for s in range(3)]
    assert [abs(c / len(drawn) - w) for c, w in zip(counts, (0.6, 0.15, 0.25))] < [0.01] * 3, counts
    small = [i - 50 for i in drawn if 50 <= i < 57]
    for epoch in range(len(small) // 7):  # every pass over the 7-sequence source visits each once
        assert sorted(small[epoch * 7:(epoch + 1) * 7]) == list(range(7))


def test_mixture_stream_is_the_same_under_any_world_size_and_micro_batch_and_resumes_exactly():
    reference, _ = _global_steps(1, 24, 10)
    assert _global_steps(2, 3, 10)[0] == reference and _global_steps(4, 2, 10)[0] == reference
    first, state = _global_steps(2, 4, 4)
    rest, _ = _global_steps(3, 2, 6, state=json.loads(json.dumps(state)))  # through JSON, on another world
    assert first + rest == reference


def test_mixture_refuses_a_state_of_other_shares():
    _, state = _global_steps(1, 4, 2)
    sampler = MixtureSampler((50, 7, 20), (0.5, 0.25, 0.25), 0, 1, 7, 4, 24)
    with pytest.raises(ValueError, match="saved with weights"):
        sampler.load_state_dict(state)


def _two_source_overrides(out: Path, *extra: str) -> tuple[str, ...]:
    return ("data.paths=[]", f"data.sources={json.dumps([{'name': 'security', 'paths': [str(TINY / 'corpus')]}])}",
            f"data.replay={json.dumps({'name': 'general', 'paths': [str(TINY / 'general')], 'share': 0.25})}",
            f"data.prepared_dir={out / 'data'}", "hardware.gpus_per_node=1", "strategy=ddp",
            "eval.benchmarks=[]", "checkpoint.export_hf=false", "training.tokens=16384", *extra)


def _compile(out: Path, *extra: str) -> Path:
    compiled = compile_recipe(TINY_RECIPE, overrides=_two_source_overrides(out, *extra), output=str(out / "run"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(compiled.plan.text())
    return out / "plan.json"


def test_two_sources_plan_with_their_shares_and_prepare_into_folders_of_their_own(tmp_path: Path):
    result = CliRunner().invoke(main, ["plan", str(TINY_RECIPE), *(f"--set={o}" for o in _two_source_overrides(
        tmp_path))])
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())  # rich wraps long lines at the terminal's width
    assert "source security (domain, weight 1): 46,661 bytes ≈ 11,665 tokens; draws 12,288 (75.0%, 1.05 epochs)" \
        in text
    assert "source general (replay, replay share 0.25): 10,005 bytes ≈ 2,501 tokens; draws 4,096 (25.0%, 1.64 " \
           "epochs)" in text
    rendered = tmp_path / "rendered"
    result = CliRunner().invoke(main, ["render", str(TINY_RECIPE), "-o", str(rendered), *(
        f"--set={o}" for o in _two_source_overrides(tmp_path, "hardware.nodes=2"))])
    assert result.exit_code == 0, result.stderr
    # A second node waits for every source's manifest before it trains.
    job = (rendered / "job.sbatch").read_text() + (rendered / "pytorchjob.yaml").read_text()
    assert all(f"{tmp_path / 'data' / name}/manifest.json" in job for name in ("security", "general"))
    plan_path = _compile(tmp_path)
    plan = json.loads(plan_path.read_text())
    assert [(s["name"], s["role"], s["prepared_dir"]) for s in plan["corpus"]["sources"]] == [
        ("security", "domain", str(tmp_path / "data" / "security")),
        ("general", "replay", str(tmp_path / "data" / "general"))]
    done = subprocess.run([*launch_command(plan_path, 1)[:2], "runtime.prepare", "--plan", str(plan_path),
                           "--no-progress", "--json"], cwd=REPO, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    manifests = json.loads(done.stdout)
    assert sorted(manifests) == ["general", "security"]
    assert {f["path"] for f in manifests["general"]["files"]} == {str(p) for p in (TINY / "general").iterdir()}


def test_two_sources_train_at_their_shares_and_kill_9_resumes_the_same_stream(tmp_path: Path):
    reference = _compile(tmp_path / "reference", "checkpoint.every_steps=4")
    subprocess.run([*launch_command(reference, 1)[:2], "runtime.prepare", "--plan", str(reference), "--no-progress"],
                   cwd=REPO, env=run_env(), check=True, capture_output=True)
    train(reference, 1)
    steps = records(reference, "step")
    final = steps[-1]["source_sequences"]
    assert final["general"] / sum(final.values()) == pytest.approx(0.25, abs=0.01)
    assert [sum(r["source_sequences"].values()) for r in steps] == [8 * (i + 1) for i in range(16)]

    killed = _compile(tmp_path / "killed", "checkpoint.every_steps=4")
    subprocess.run([*launch_command(killed, 1)[:2], "runtime.prepare", "--plan", str(killed), "--no-progress"],
                   cwd=REPO, env=run_env(), check=True, capture_output=True)
    step_8 = tmp_path / "killed" / "run" / "checkpoints" / "step-8" / "meta.json"
    train_killed_once(killed, 1, step_8, tmp_path / "killed.log")
    train(killed, 1)
    again = {r["step"]: r for r in records(killed, "step")}  # the later record of a step counts
    assert sorted(again) == list(range(1, 17))
    for r in steps:
        assert again[r["step"]]["source_sequences"] == r["source_sequences"]
        assert again[r["step"]]["loss"] == pytest.approx(r["loss"], rel=1e-6), r["step"]


def test_the_plans_filters_reach_prepare_planted_items_and_copies_are_dropped_and_listed(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted((TINY / "corpus").iterdir())[:6]:
        (corpus / path.name).write_text(path.read_text())
    (corpus / "copy.txt").write_text((TINY / "corpus" / "zero-trust.txt").read_text())  # zero-trust comes later
    (corpus / "zero-trust.txt").write_text((TINY / "corpus" / "zero-trust.txt").read_text())
    (corpus / "planted.txt").write_text(
        "Notes from the quiz night. Which ATT&CK tactic covers keeping access to a system across restarts? "
        "Persistence, Exfiltration, Discovery, Impact. Most teams said the first.\n")  # question + options
    compiled = compile_recipe(TINY_RECIPE, overrides=(
        f"data.paths={json.dumps([str(corpus)])}", f"data.prepared_dir={tmp_path / 'data'}",
        'data.dedup={"exact": true}'), output=str(tmp_path / "run"))
    assert compiled.plan.corpus.dedup.exact and set(compiled.plan.corpus.decontamination.benchmarks) == {
        "cti-mcq", "cybermetric", "seceval"}
    from runtime.prepare import prepare_from_plan

    (manifest,) = prepare_from_plan(compiled.plan, workers=1, progress=False)
    dropped = {(Path(d["where"]["path"]).name, d["reason"]) for d in manifest.filters.dropped}
    assert dropped == {("planted.txt", "contaminated"), ("zero-trust.txt", "exact_duplicates")}
    (planted,) = [d for d in manifest.filters.dropped if d["reason"] == "contaminated"]
    assert planted["benchmark"] == "cti-mcq" and planted["row"].endswith("cti-mcq.tsv:3")
