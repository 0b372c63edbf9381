"""Damaged and unwritable checkpoints: resume skips to the previous complete one, a full disk leaves it intact.

Files are real (torch.save, DCP); a full disk is a real EFBIG from RLIMIT_FSIZE in a subprocess, so the limit
never reaches pytest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.checkpoint import (
    complete_checkpoints,
    latest_checkpoint,
    save_checkpoint,
    trainer_state_path,
)
from tests.conftest import REPO
from tests.train_support import free_port, run_env

PLAN = {"plan_sha256": "a" * 64}


def _write(folder: Path) -> None:
    """A checkpoint's shape in small: a model shard and one rank's trainer state."""
    (folder / "dcp").mkdir()
    torch.save({"w": torch.arange(1024, dtype=torch.float32)}, folder / "dcp" / "__0_0.distcp")
    path = trainer_state_path(folder, 0)
    path.parent.mkdir()
    torch.save({"step": 0}, path)


def _save(root: Path, *steps: int, keep_last: int = 3) -> None:
    for step in steps:
        save_checkpoint(root, step, PLAN, _write, keep_last)


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _shard(root: Path, step: int) -> Path:
    return root / f"step-{step}" / "dcp" / "__0_0.distcp"


def test_meta_json_records_every_file_and_its_size(tmp_path: Path):
    root = tmp_path / "checkpoints"
    _save(root, 4)
    meta = json.loads((root / "step-4" / "meta.json").read_text())
    assert meta["format_version"] == 2
    assert meta["manifest"] == {
        "dcp/__0_0.distcp": _shard(root, 4).stat().st_size,
        "trainer/rank-00000.pt": trainer_state_path(root / "step-4", 0).stat().st_size,
    }


def test_truncated_file_skips_to_the_previous_checkpoint_with_one_line(tmp_path: Path, capfd):
    root = tmp_path / "checkpoints"
    _save(root, 4, 8)
    recorded = _shard(root, 8).stat().st_size
    os.truncate(_shard(root, 8), 1024)
    assert latest_checkpoint(root) == root / "step-4"
    assert complete_checkpoints(root) == [(4, root / "step-4")]
    assert capfd.readouterr().err == (
        f"skipping {root / 'step-8'}: dcp/__0_0.distcp has 1,024 bytes, meta.json recorded {recorded:,}; "
        "falling back to step-4\n"
    )


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda folder: (folder / "trainer" / "rank-00000.pt").unlink(),
         "trainer/rank-00000.pt is missing, meta.json recorded {trainer_bytes:,} bytes"),
        (lambda folder: (folder / "meta.json").write_text('{"plan_sha256": '),
         "meta.json does not parse (Expecting value: line 1 column 17 (char 16))"),
        (lambda folder: (folder / "meta.json").write_bytes(b"\xff\xfe"),
         "meta.json does not parse ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)"),
        (lambda folder: (folder / "meta.json").write_text("[]"), "meta.json is not a JSON object"),
        (lambda folder: (folder / "meta.json").write_text(json.dumps({**PLAN, "format_version": 2})),
         "meta.json has no manifest of file sizes"),
        (lambda folder: (folder / "meta.json").unlink(), "no meta.json"),
    ],
    ids=["deleted file", "truncated meta.json", "binary meta.json", "meta.json not an object",
         "meta.json without manifest", "no meta.json"],
)
def test_damaged_newest_checkpoint_is_skipped_naming_what_is_wrong(tmp_path: Path, capfd, damage, problem: str):
    root = tmp_path / "checkpoints"
    _save(root, 4, 8)
    trainer_bytes = trainer_state_path(root / "step-8", 0).stat().st_size
    damage(root / "step-8")
    assert latest_checkpoint(root) == root / "step-4"
    assert capfd.readouterr().err == (
        f"skipping {root / 'step-8'}: {problem.format(trainer_bytes=trainer_bytes)}; falling back to step-4\n"
    )


def test_every_damaged_checkpoint_newer_than_the_complete_one_gets_its_line(tmp_path: Path, capfd):
    root = tmp_path / "checkpoints"
    _save(root, 4, 8, 12)
    os.truncate(_shard(root, 12), 0)
    (root / "step-8" / "meta.json").unlink()
    assert latest_checkpoint(root) == root / "step-4"
    recorded = _shard(root, 4).stat().st_size
    assert capfd.readouterr().err == (
        f"skipping {root / 'step-12'}: dcp/__0_0.distcp has 0 bytes, meta.json recorded {recorded:,}; "
        "falling back to step-4\n"
        f"skipping {root / 'step-8'}: no meta.json; falling back to step-4\n"
    )


def test_no_complete_checkpoint_left_starts_over_and_says_so(tmp_path: Path, capfd):
    root = tmp_path / "checkpoints"
    _save(root, 4)
    (root / "step-4" / "dcp" / "__0_0.distcp").unlink()
    (root / "step-4" / "trainer" / "rank-00000.pt").unlink()
    assert latest_checkpoint(root) is None
    err = capfd.readouterr().err
    assert err.startswith(f"skipping {root / 'step-4'}: dcp/__0_0.distcp is missing, meta.json recorded ")
    assert err.endswith(" bytes (and 1 more files); no earlier complete checkpoint\n")


def test_skip_lines_come_from_rank_0_only(tmp_path: Path, capfd, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 4, 8)
    os.truncate(_shard(root, 8), 1024)
    monkeypatch.setenv("RANK", "1")  # as torchrun starts every rank, before init_process_group
    assert latest_checkpoint(root) == root / "step-4"
    assert capfd.readouterr().err == ""


def test_format_1_checkpoint_without_manifest_counts_as_complete(tmp_path: Path, capfd):
    root = tmp_path / "checkpoints"
    _save(root, 4)
    meta_path = root / "step-4" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["manifest"]
    meta_path.write_text(json.dumps({**meta, "format_version": 1}))
    os.truncate(_shard(root, 4), 1024)  # undetectable: format 1 recorded no sizes
    assert latest_checkpoint(root) == root / "step-4"
    assert capfd.readouterr().err == ""


def test_pruning_keeps_the_newest_complete_checkpoint_when_newer_ones_are_damaged(tmp_path: Path, capfd):
    root = tmp_path / "checkpoints"
    _save(root, 4, 8, 12)
    os.truncate(_shard(root, 8), 1024)
    os.truncate(_shard(root, 12), 1024)
    assert latest_checkpoint(root) == root / "step-4"  # the run resumes after step 4, then saves step 8 again
    _save(root, 8, keep_last=1)
    assert _names(root) == ["step-12", "step-8"]  # the damaged step-12 did not count as one of the newest
    assert complete_checkpoints(root) == [(8, root / "step-8")]
    capfd.readouterr()
    assert latest_checkpoint(root) == root / "step-8"


def test_pruning_deletes_damaged_checkpoints_older_than_the_kept_ones(tmp_path: Path):
    root = tmp_path / "checkpoints"
    _save(root, 4, 8)
    os.truncate(_shard(root, 4), 1024)
    _save(root, 12, keep_last=2)
    assert _names(root) == ["step-12", "step-8"]


_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
import torch
import torch.distributed.checkpoint as dcp
from runtime.checkpoint import CheckpointError, save_checkpoint

root, writer = Path(sys.argv[1]), sys.argv[2]

def write(folder, numel):
    tensor = torch.zeros(numel)
    if writer == "dcp.save":
        dcp.save({"w": tensor}, checkpoint_id=str(folder / "dcp"))
    elif writer == "torch.save to a path":
        torch.save(tensor, folder / "model.pt")
    else:
        with open(folder / "model.pt", "wb") as f:
            torch.save(tensor, f)

save_checkpoint(root, 4, {}, lambda folder: write(folder, 16), keep_last=1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
big = writer != "meta.json"
try:
    save_checkpoint(root, 8, {"note": "x" * (0 if big else 1_000_000)}, lambda f: write(f, 1_000_000 if big else 16),
                    keep_last=1)
except (Exception, CheckpointError) as e:
    print(f"{type(e).__name__}: {e}")
"""


@pytest.mark.parametrize("writer", ["torch.save to a file", "dcp.save", "meta.json"])
def test_full_disk_mid_checkpoint_raises_one_line_and_leaves_the_previous_intact(tmp_path: Path, writer: str):
    root = tmp_path / "checkpoints"
    done = _run(_FULL_DISK, str(root), writer)
    assert done.stdout == (
        f"CheckpointError: {root}: could not write checkpoint step-8 (File too large); step-4 is intact; "
        "free space and relaunch to resume from it\n"
    ), done.stderr
    assert _names(root) == ["step-4"]
    assert latest_checkpoint(root) == root / "step-4"


def test_write_failure_the_storage_does_not_explain_is_reraised_and_leaves_the_previous_intact(tmp_path: Path):
    root = tmp_path / "checkpoints"
    done = _run(_FULL_DISK, str(root), "torch.save to a path")  # torch's path writer hides the EFBIG
    assert done.stdout.startswith("RuntimeError: "), done.stderr
    assert _names(root) == ["step-4"]
    assert latest_checkpoint(root) == root / "step-4"


_TWO_RANKS = """
import datetime, json, resource, signal, sys
from pathlib import Path
import torch
import torch.distributed as dist
from runtime.checkpoint import save_checkpoint

root, fault = Path(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()

def write(folder, numel):
    with open(folder / f"rank-{rank}.pt", "wb") as f:
        torch.save(torch.zeros(numel), f)
    if fault == "bug" and numel > 16 and rank == 1:
        raise ValueError("boom")

save_checkpoint(root, 4, {}, lambda folder: write(folder, 16), keep_last=1)
if fault == "full disk" and rank == 1:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
try:
    save_checkpoint(root, 8, {}, lambda folder: write(folder, 1_000_000), keep_last=1)
    result = "saved"
except BaseException as e:
    result = f"{type(e).__name__}: {e}"
dist.barrier()  # the ranks are still in step after the failed save
(root.parent / f"rank-{rank}.json").write_text(json.dumps(result))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("fault", ["full disk", "bug"])
def test_one_rank_failing_to_write_makes_every_rank_raise_instead_of_hanging(tmp_path: Path, fault: str):
    root = tmp_path / "checkpoints"
    env = {**run_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, "-c", _TWO_RANKS, str(root), fault], cwd=REPO,
                              env={**env, "RANK": str(rank)}, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    errs = [rank.communicate(timeout=120)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], errs
    results = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    if fault == "full disk":
        message = (f"CheckpointError: {root}: could not write checkpoint step-8 (rank 1: File too large); "
                   "step-4 is intact; free space and relaunch to resume from it")
        assert results == [message, message]
    else:
        assert results == [f"CheckpointError: {root}: could not write checkpoint step-8 (rank 1: ValueError: boom); "
                           "step-4 is intact; rank 1's traceback says why", "ValueError: boom"]
    assert _names(root) == ["step-4"]
    assert latest_checkpoint(root) == root / "step-4"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**run_env(), "PYTHONDONTWRITEBYTECODE": "1"}  # under RLIMIT_FSIZE, only the checkpoint may fail
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
