"""Rendered artifacts: byte-identical goldens, deterministic, shellcheck-clean, every value quoted."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dapc.cli import main
from tests.conftest import REPO

GOLDEN = REPO / "tests" / "golden"
# (golden name, recipe, overrides). Paths inside artifacts are written as <REPO> and <OUT>.
GOLDEN_CASES = [
    ("tiny-fsdp2", "examples/tiny/recipe.yaml", ()),
    ("tiny-zero3", "examples/tiny/recipe.yaml", ("strategy=zero3",)),
    ("llama3.3-70b-fsdp2-4-nodes", "recipes/cyber-dap-llama3.3-70b.yaml", ()),
    ("llama3.1-8b-zero3", "recipes/zero3-cpt-llama3.1-8b.yaml", ()),
]


def _render(recipe: str, out: Path, overrides=()) -> dict[str, str]:
    args = ["render", str(REPO / recipe), "-o", str(out)] + [a for s in overrides for a in ("--set", s)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    files = {p.name: p.read_text() for p in sorted(out.iterdir()) if p.is_file()}
    manifest = json.loads(files.pop(".dapc-render.json"))  # hashes of path-dependent files: checked here, not golden
    assert manifest["files"] == {n: hashlib.sha256(t.encode()).hexdigest() for n, t in files.items()}
    return files


def _masked(text: str, out: Path, plan: dict) -> str:
    # Paths differ between checkouts, and with them the hashes over the resolved recipe; the hashes are
    # checked by test_plan_hashes_cover_recipe_and_plan and determinism by the byte-identical test.
    text = text.replace(plan["recipe_sha256"], "<RECIPE_SHA256>").replace(plan["plan_sha256"], "<PLAN_SHA256>")
    text = text.replace(plan["trajectory_sha256"], "<TRAJECTORY_SHA256>")
    text = text.replace(str(out), "<OUT>").replace(str(REPO), "<REPO>")
    # provenance is outside both hashes and may change between versions; everything else is pinned. The lock's
    # versions (and the packaged tokenizer's hash) are this machine's; its corpus hashes are the repo's files.
    lock = plan["provenance"]["lock"]
    versions = {**lock["packages"], "python": lock["python"]}
    for name, version in versions.items():  # in plan.json, and JSON-escaped in the plan pytorchjob.yaml embeds
        found, masked = f'"{name}": {json.dumps(version)}', f'"{name}": "<VERSION>"'
        text = text.replace(found, masked).replace(found.replace('"', '\\"'), masked.replace('"', '\\"'))
    if lock["tokenizer_sha256"]:
        text = text.replace(lock["tokenizer_sha256"], "<TOKENIZER_SHA256>")
    return text.replace(f'"dapc_version": "{_version()}"', '"dapc_version": "<VERSION>"').replace(
        f"dapc {_version()}", "dapc <VERSION>")


def _version() -> str:
    from dapc import __version__

    return __version__


@pytest.mark.parametrize("name,recipe,overrides", GOLDEN_CASES, ids=[c[0] for c in GOLDEN_CASES])
def test_rendered_artifacts_match_golden_files(tmp_path, name, recipe, overrides):
    out = tmp_path / "run"
    rendered = _render(recipe, out, overrides)
    plan = json.loads(rendered["plan.json"])
    files = {k: _masked(v, out, plan) for k, v in rendered.items()}
    golden_dir = GOLDEN / name
    if os.environ.get("DAPC_UPDATE_GOLDEN"):
        shutil.rmtree(golden_dir, ignore_errors=True)
        golden_dir.mkdir(parents=True)
        for file_name, text in files.items():
            (golden_dir / file_name).write_text(text)
    expected = {p.name: p.read_text() for p in sorted(golden_dir.iterdir())}
    assert sorted(files) == sorted(expected)
    for file_name in files:
        assert files[file_name] == expected[file_name], f"{name}/{file_name} differs from its golden file"


def test_same_recipe_renders_byte_identical_artifacts(tmp_path):
    first = _render("recipes/cyber-dap-llama3.3-70b.yaml", tmp_path / "a")
    (tmp_path / "b").mkdir()
    second = _render("recipes/cyber-dap-llama3.3-70b.yaml", tmp_path / "a")
    assert first == second


def test_plan_hashes_cover_recipe_and_plan(tmp_path):
    from dapc.plan_schema import sha256_of

    plan = json.loads(_render("examples/tiny/recipe.yaml", tmp_path / "run")["plan.json"])
    assert plan["recipe_sha256"] == sha256_of(plan["recipe"])
    body = {k: v for k, v in plan.items() if k not in ("provenance", "plan_sha256")}
    assert plan["plan_sha256"] == sha256_of(body)


def test_ds_config_is_written_only_for_deepspeed_strategies(tmp_path):
    assert "ds_config.json" not in _render("examples/tiny/recipe.yaml", tmp_path / "fsdp")
    files = _render("examples/tiny/recipe.yaml", tmp_path / "zero", ("strategy=zero2",))
    ds = json.loads(files["ds_config.json"])
    plan = json.loads(files["plan.json"])
    assert ds == plan["runtime"]["deepspeed"]
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert ds["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("name,recipe,overrides", GOLDEN_CASES, ids=[c[0] for c in GOLDEN_CASES])
def test_rendered_scripts_pass_shellcheck(tmp_path, name, recipe, overrides):
    out = tmp_path / "run"
    _render(recipe, out, overrides)
    result = subprocess.run(["shellcheck", "--severity=style", str(out / "launch.sh"), str(out / "job.sbatch")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hostile_values_reach_the_shell_quoted(tmp_path):
    recipe = yaml.safe_load((REPO / "examples/tiny/recipe.yaml").read_text())
    recipe["data"]["paths"] = [str(REPO / "examples/tiny/corpus")]
    recipe["launch"]["env"] = {"EVIL": "$(touch pwned) `touch pwned2`; rm -rf / \"'"}
    recipe["launch"]["python"] = "python3 -c 'import os'; touch pwned3"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run with space"
    result = CliRunner().invoke(main, ["render", str(tmp_path / "recipe.yaml"), "-o", str(out)])
    assert result.exit_code == 2, result.output  # the sbatch --output directive cannot carry a space
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["render", str(tmp_path / "recipe.yaml"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    launch = (out / "launch.sh").read_text()
    assert "export EVIL=" + "'$(touch pwned) `touch pwned2`; rm -rf / \"'\"'\"''" in launch
    # Running the env part of the script must not execute anything.
    env_lines = "\n".join(line for line in launch.splitlines() if line.startswith("export "))
    subprocess.run(["bash", "-c", env_lines + '\nprintf %s "$EVIL"'], cwd=tmp_path, check=True, capture_output=True)
    assert not list(tmp_path.glob("pwned*"))
    # SC2016 (info: "expressions don't expand in single quotes") is the point here, so warnings and up.
    assert subprocess.run(["shellcheck", "--severity=warning", str(out / "launch.sh")]).returncode == 0
    k8s = list(yaml.safe_load_all((out / "pytorchjob.yaml").read_text()))
    env = k8s[1]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "EVIL", "value": recipe["launch"]["env"]["EVIL"]} in env


def test_pytorchjob_embeds_the_plan_and_has_one_worker_per_extra_node(tmp_path):
    files = _render("recipes/cyber-dap-llama3.3-70b.yaml", tmp_path / "run")
    config_map, job = yaml.safe_load_all(files["pytorchjob.yaml"])
    assert json.loads(config_map["data"]["plan.json"]) == json.loads(files["plan.json"])
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    limits = replicas["Master"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": 8}


def test_sbatch_is_accepted_by_a_real_slurm_controller(tmp_path, slurm_cluster):
    """`sbatch --test-only` on a real slurmctld whose `gpu` partition has 8-GPU nodes (emulated)."""
    out = tmp_path / "run"
    _render("recipes/cyber-dap-llama3.3-70b.yaml", out)
    code, text = slurm_cluster.test_only(out / "job.sbatch", cwd=out)
    assert code == 0 and "to start at" in text, text
    _render("recipes/cyber-dap-llama3.3-70b.yaml", out, ("hardware.nodes=32",))
    code, text = slurm_cluster.test_only(out / "job.sbatch", cwd=out)
    assert code != 0 and "Requested node configuration is not available" in text, text


def _render_cli(recipe: str, out: Path, *extra: str):
    return CliRunner().invoke(main, ["render", str(REPO / recipe), "-o", str(out), *extra])


def test_render_never_replaces_a_file_it_did_not_write(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text("my own notes\n")
    (out / "notes.txt").write_text("keep\n")
    result = _render_cli("examples/tiny/recipe.yaml", out)
    assert result.exit_code == 2
    assert result.stderr == (f"error: {out}: holds README.md that dapc did not write (or that changed since it "
                             "rendered them); render elsewhere with -o, or pass --force to replace them\n")
    assert (out / "README.md").read_text() == "my own notes\n" and not (out / "plan.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "notes.txt"]  # no temp file left behind
    assert _render_cli("examples/tiny/recipe.yaml", out, "--force").exit_code == 0
    assert (out / "README.md").read_text() != "my own notes\n" and (out / "notes.txt").read_text() == "keep\n"


def test_render_again_replaces_its_own_files_and_removes_its_stale_ones(tmp_path):
    out = tmp_path / "run"
    assert _render_cli("examples/tiny/recipe.yaml", out, "--set", "strategy=zero2").exit_code == 0
    assert (out / "ds_config.json").exists()
    assert _render_cli("examples/tiny/recipe.yaml", out).exit_code == 0  # FSDP2 now: no DeepSpeed config
    assert not (out / "ds_config.json").exists()
    (out / "launch.sh").write_text("#!/bin/sh\necho edited by hand\n")
    assert _render_cli("examples/tiny/recipe.yaml", out).exit_code == 2  # an edited artifact is the user's now


def test_render_respects_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        assert _render_cli("examples/tiny/recipe.yaml", tmp_path / "run").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "run" / "launch.sh").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "run" / "plan.json").stat().st_mode & 0o777 == 0o600


def test_render_refuses_an_empty_or_file_target(tmp_path):
    result = CliRunner().invoke(main, ["render", str(REPO / "examples/tiny/recipe.yaml"), "-o", ""])
    assert (result.exit_code, result.stderr) == (2, "error: -o: the output directory is empty; name one\n")
    (tmp_path / "file").write_text("x")
    result = _render_cli("examples/tiny/recipe.yaml", tmp_path / "file" / "run")
    assert (result.exit_code, result.stderr) == (2, f"error: {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a "
                                                    "file, not a directory\n")


def test_render_where_it_cannot_write_is_one_located_line(tmp_path):
    target = Path("/proc/dapc-cannot-write-here")
    result = _render_cli("examples/tiny/recipe.yaml", target)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {target}: cannot write here: ")


def test_passthrough_env_is_named_in_every_artifact_and_its_value_never_written(tmp_path):
    secret = "hf_s3cr3t-value"
    out = tmp_path / "run"
    files = _render("examples/tiny/recipe.yaml", out, ["launch.passthrough_env=[HF_TOKEN]"])
    assert not any(secret in text for text in files.values())
    assert 'export HF_TOKEN="${HF_TOKEN:?' in files["launch.sh"] and 'export HF_TOKEN="${HF_TOKEN:?' in files["job.sbatch"]
    job = list(yaml.safe_load_all(files["pytorchjob.yaml"]))[1]
    env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "dapc-secrets", "key": "HF_TOKEN"}}} in env
    # Not exported where the script runs: it stops before doing anything, naming the variable.
    env_without = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    done = subprocess.run(["bash", str(out / "launch.sh")], env=env_without, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and not (out / "data").exists()
    assert "HF_TOKEN: is passed through from the environment this script runs in: export it first" in done.stderr


@pytest.mark.parametrize(("value", "message"), [
    ("[HF_TOKEN, HF_TOKEN]", "a name is listed twice"),
    ("[MASTER_ADDR]", "'MASTER_ADDR' is set by the rendered launch scripts or torchrun"),
    ("[PET_NNODES]", "'PET_NNODES' is set by the rendered launch scripts or torchrun"),
    ("['1BAD']", "'1BAD' is not a valid environment variable name"),
    ("[OMP_NUM_THREADS]", "OMP_NUM_THREADS is both set in launch.env and passed through; keep one"),
])
def test_passthrough_env_names_are_checked(tmp_path, value, message):
    result = _render_cli("examples/tiny/recipe.yaml", tmp_path / "run", "--set", f"launch.passthrough_env={value}")
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
