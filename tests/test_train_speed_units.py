"""The trainer's speed pieces in one process: transparent huge pages for large CPU tensors, fused AdamW against
torch's default AdamW, and the stop check of a single process without a collective. A few seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from runtime.train.config import load_plan
from runtime.train.distributed import Distributed
from runtime.train.host_allocator import THP_ENV, use_huge_pages
from runtime.train.loop import _stop_requested
from runtime.train.optim import build_optimizer, fused_adamw, param_groups
from tests.conftest import REPO

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# Eight forward and backward passes through an LM head with 1,024 × 32,000 fp32 logits (125 MiB), after
# `use_huge_pages()` or after a first small tensor; prints what it returned and the page faults of each pass.
_FAULTS = """
import json, resource, sys
import torch
if sys.argv[1] == "after-a-tensor":
    torch.zeros(1)
from runtime.train.host_allocator import use_huge_pages
huge = use_huge_pages()
torch.manual_seed(0)
head = torch.nn.Linear(64, 32000)
hidden, target = torch.randn(1024, 64, requires_grad=True), torch.randint(0, 32000, (1024,))
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.nn.functional.cross_entropy(head(hidden), target).backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"huge": huge, "faults": faults}))
"""
LOGITS_PAGES = 1024 * 32000 * 4 // os.sysconf("SC_PAGE_SIZE")
needs_thp = pytest.mark.skipif(not THP_MODE.is_file() or "[never]" in THP_MODE.read_text(),
                               reason="the kernel has no transparent huge pages")


def _faults(order: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != THP_ENV}
    done = subprocess.run([sys.executable, "-c", _FAULTS, order], cwd=REPO, env={**clean, **env}, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_thp
def test_huge_pages_fault_large_tensors_in_a_fraction_of_the_4k_faults():
    huge, late = _faults("first"), _faults("after-a-tensor")
    assert huge["huge"] and not late["huge"]  # PyTorch read the setting at its first allocation
    assert all(f >= 3 * LOGITS_PAGES for f in late["faults"][2:]), late  # logits and their gradients, 4 KiB each
    assert all(f < LOGITS_PAGES // 4 for f in huge["faults"][2:]), huge  # the same memory in 2 MiB faults


@needs_thp
def test_huge_pages_turned_off_by_the_environment_stay_off():
    off = _faults("first", **{THP_ENV: "0"})
    assert not off["huge"]
    assert all(f >= 3 * LOGITS_PAGES for f in off["faults"][2:]), off


def test_huge_pages_are_not_asked_for_where_the_kernel_has_none(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(THP_ENV, raising=False)
    (tmp_path / "enabled").write_text("always madvise [never]\n")
    assert not use_huge_pages(tmp_path / "enabled")
    assert not use_huge_pages(tmp_path / "missing")
    assert THP_ENV not in os.environ


@pytest.fixture
def tiny_plan(tmp_path: Path):
    from dapc.compile import compile_recipe

    plan = compile_recipe(REPO / "examples" / "tiny" / "recipe.yaml", ("strategy=ddp", "hardware.gpus_per_node=1"),
                          output=str(tmp_path / "run")).plan
    path = tmp_path / "plan.json"
    path.write_text(plan.text())
    return load_plan(path)


def test_fused_adamw_follows_torch_default_adamw(tiny_plan):
    from runtime.train.model import build_model

    models = [build_model(tiny_plan, torch.device("cpu")) for _ in range(2)]
    fused = build_optimizer(tiny_plan, param_groups(models[0], tiny_plan.weight_decay))
    reference = torch.optim.AdamW(param_groups(models[1], tiny_plan.weight_decay), lr=tiny_plan.lr, foreach=False,
                                  betas=(tiny_plan.adam_beta1, tiny_plan.adam_beta2), eps=tiny_plan.adam_eps)
    assert fused.defaults["fused"] and fused_adamw(fused.param_groups)
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_plan.model_config["vocab_size"], (2, 16))
    for _ in range(3):
        for model, optimizer in zip(models, (fused, reference)):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for got, expected in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_fused_adamw_needs_floating_point_parameters():
    assert fused_adamw([{"params": [torch.nn.Parameter(torch.zeros(2))]}])
    assert not fused_adamw([{"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.int8), requires_grad=False)]}])
    assert not fused_adamw([{"params": []}])


def test_a_single_process_reads_the_stop_file_without_a_collective(tiny_plan):
    single = Distributed(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), timeout=timedelta(seconds=1))
    assert not torch.distributed.is_initialized()  # a collective would raise here
    assert not _stop_requested(tiny_plan, single)
    Path(tiny_plan.stop_file).parent.mkdir(parents=True, exist_ok=True)
    Path(tiny_plan.stop_file).touch()
    assert _stop_requested(tiny_plan, single)
