"""The README's CPU example, run verbatim in a fresh copy of the repository with no `../shared` beside it.

The copy holds what a clone would (`git ls-files --cached --others --exclude-standard`: tracked files plus new
ones not ignored, so never `runs/` or caches), so the shipped `examples/tiny/corpus` alone must feed the run.
A `dapc` shim on PATH and PYTHONPATH at the copy make the command, and the `python -m runtime.*` steps of the
rendered launch.sh, run the copy's code rather than the editable install's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

COMMAND_PREFIX = "dapc render examples/tiny/recipe.yaml"
TIMEOUT_SECONDS = 600


def _readme_command() -> str:
    lines = [line.strip() for line in (REPO / "README.md").read_text().splitlines()]
    found = [line for line in lines if line.startswith(COMMAND_PREFIX)]
    assert len(found) == 1, f"README.md should hold one line starting {COMMAND_PREFIX!r}, found {found}"
    return found[0]


def _other_dapc_commands(example: str) -> list[str]:
    """Every `dapc ...` command of the README's bash blocks but the example itself, in order (the README's
    first command installs and plans; its `dapc plan` part is one of these). `sbatch` and `bash` lines need
    a cluster or GPUs; the example run covers launch.sh on the CPU."""
    commands, in_block = [], False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_block = line.strip() == "```bash"
            continue
        if in_block and line.strip() != example:
            for part in line.split("#", 1)[0].split("&&"):
                if part.strip().startswith("dapc "):
                    commands.append(part.strip())
    return commands


def _fresh_copy(dest: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if not source.is_file():  # tracked but deleted in the working tree
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return dest


def _env(copy: Path, bin_dir: Path) -> dict[str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "PYTHONPATH": str(copy), "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
            "DAPC_DIST_TIMEOUT_SECONDS": "120", "PYTHONUNBUFFERED": "1"}


def test_readme_cpu_example_runs_verbatim_in_a_fresh_clone(tmp_path):
    command = _readme_command()
    copy = _fresh_copy(tmp_path / "x" / "repo")
    assert not (copy.parent / "shared").exists()
    assert not (copy / "runs").exists()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "dapc"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m dapc "$@"\n')
    shim.chmod(0o755)
    env = _env(copy, bin_dir)

    where = subprocess.run([sys.executable, "-c", "import dapc, runtime; print(dapc.__file__, runtime.__file__)"],
                           cwd=copy, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(copy) for p in where), where

    done = subprocess.run(["bash", "-c", command], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_SECONDS)
    assert done.returncode == 0, f"{command} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"

    out = copy / re.search(r"\s-o\s+(\S+)", command).group(1)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["recipe"]["data"]["paths"] == [str(copy / "examples" / "tiny" / "corpus")]
    manifest = json.loads((Path(plan["paths"]["prepared_dir"]) / "manifest.json").read_text())
    batch = plan["recipe"]["training"]["global_batch_sequences"]
    assert manifest["splits"]["train"]["sequences"] >= batch, manifest["splits"]
    assert manifest["splits"]["validation"]["sequences"] >= 1, manifest["splits"]

    events = [json.loads(line) for line in Path(plan["paths"]["metrics_path"]).read_text().splitlines()]
    assert [e for e in events if e.get("event") == "end"], events[-5:]
    assert (out / "export" / "config.json").is_file()
    if plan["recipe"]["eval"]["benchmarks"]:
        results = json.loads((out / "eval" / "results.json").read_text())
        assert set(results["models"]) == {"model", "compare_to"}

    # Then every other dapc command the README shows, in the same copy (`dapc report runs/tiny` reads the
    # example's run).
    others = _other_dapc_commands(command)
    assert any(c.startswith("dapc report") for c in others) and any(c.startswith("dapc diff") for c in others)
    for other in others:
        done = subprocess.run(["bash", "-c", other], cwd=copy, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{other} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
