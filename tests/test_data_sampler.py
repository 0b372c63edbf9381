"""runtime.data: disjoint ranks, seeded per-epoch shuffling, exact resume, and reading packed shards."""

from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

import torch

from runtime.data import DistributedResumableSampler, PackedDataset
from runtime.prepare import PrepareError


def _batches(sampler: DistributedResumableSampler, count: int) -> list[list[int]]:
    """The next `count` micro-batches, epoch after epoch, as a training loop draws them."""
    out: list[list[int]] = []
    while len(out) < count:
        out += itertools.islice(iter(sampler), count - len(out))
    return out


def test_ranks_get_disjoint_samples_that_cover_all_but_the_tail_of_each_epoch():
    samplers = [DistributedResumableSampler(103, rank, 4, seed=5, micro_batch=3, global_batch=12) for rank in range(4)]
    epoch = [list(s) for s in samplers]
    seen = [i for rank in epoch for batch in rank for i in batch]
    assert all(len(rank) == 103 // 12 == samplers[0].steps_per_epoch for rank in epoch)
    assert len(seen) == len(set(seen)) == 8 * 12
    assert set(seen) == set(samplers[0].permutation(0)[:96].tolist())
    assert all(s.state_dict()["epoch"] == 1 and s.state_dict()["consumed_samples"] == 0 for s in samplers)


def test_epochs_are_shuffled_by_seed_and_epoch_only():
    a, b = (
        DistributedResumableSampler(50, 0, 1, seed=1, micro_batch=5, global_batch=5),
        DistributedResumableSampler(50, 0, 1, seed=1, micro_batch=5, global_batch=5),
    )
    assert _batches(a, 30) == _batches(b, 30)
    first, second = a.permutation(0), a.permutation(1)
    assert sorted(first.tolist()) == list(range(50)) and first.tolist() != second.tolist()
    assert DistributedResumableSampler(50, 0, 1, seed=2, micro_batch=5, global_batch=5).permutation(0).tolist() != first.tolist()


@pytest.mark.parametrize("k", [0, 1, 7, 8, 9, 23])
def test_resuming_after_k_batches_yields_exactly_the_uninterrupted_batches(k):
    world = 3
    uninterrupted = [
        _batches(DistributedResumableSampler(101, r, world, seed=11, micro_batch=4, global_batch=24), 30) for r in range(world)
    ]
    for rank in range(world):
        before = DistributedResumableSampler(101, rank, world, seed=11, micro_batch=4, global_batch=24)
        assert _batches(before, k) == uninterrupted[rank][:k]
        state = json.loads(json.dumps(before.state_dict()))  # plain integers: no RNG state to carry
        after = DistributedResumableSampler(101, rank, world, seed=11, micro_batch=4, global_batch=24)
        after.load_state_dict(state)
        assert _batches(after, 30 - k) == uninterrupted[rank][k:]


def test_state_dict_is_epoch_and_position():
    sampler = DistributedResumableSampler(40, 1, 2, seed=3, micro_batch=4, global_batch=8)
    _batches(sampler, 6)  # 5 steps per epoch: one epoch and one step
    assert sampler.state_dict() == {
        "epoch": 1,
        "consumed_samples": 8,
        "seed": 3,
        "num_samples": 40,
        "global_batch": 8,
        "world_size": 2,
        "micro_batch": 4,
    }
    with pytest.raises(ValueError, match=r"^sampler state was saved with seed 3, this sampler has 4$"):
        DistributedResumableSampler(40, 1, 2, seed=4, micro_batch=4, global_batch=8).load_state_dict(sampler.state_dict())


def test_too_few_samples_for_one_optimizer_step_is_refused():
    with pytest.raises(ValueError, match=r"^7 samples cannot fill one optimizer step of 8 sequences$"):
        DistributedResumableSampler(7, 0, 2, seed=0, micro_batch=2, global_batch=8)


def _steps(world: int, micro_batch: int, global_batch: int, steps: int, state: dict | None = None) -> list[set]:
    """The samples of each of the next `steps` optimizer steps, all ranks together."""
    samplers = [DistributedResumableSampler(60, r, world, 9, micro_batch, global_batch) for r in range(world)]
    for sampler in samplers:
        if state is not None:
            sampler.load_state_dict(state)
    accum = global_batch // (world * micro_batch)
    drawn = [_batches(s, steps * accum) for s in samplers]
    return [{i for rank in drawn for batch in rank[k * accum:(k + 1) * accum] for i in batch} for k in range(steps)]


@pytest.mark.parametrize("layout", [(1, 2), (2, 2), (4, 1), (2, 4)])
def test_every_optimizer_step_takes_the_same_samples_under_any_layout(layout):
    # 60 samples, G = 8: 7 steps per epoch, so 10 steps cross an epoch boundary.
    assert _steps(*layout, 8, 10) == _steps(1, 8, 8, 10)


def test_a_state_saved_at_a_step_boundary_resumes_under_another_world_size():
    one = DistributedResumableSampler(60, 0, 1, seed=9, micro_batch=4, global_batch=8)
    _batches(one, 6)  # 3 optimizer steps
    assert _steps(2, 2, 8, 6, one.state_dict()) == _steps(1, 8, 8, 9)[3:]
    half_step = DistributedResumableSampler(60, 0, 1, seed=9, micro_batch=4, global_batch=8)
    _batches(half_step, 1)
    with pytest.raises(ValueError, match="consumed_samples 4 is not a micro-step boundary"):
        DistributedResumableSampler(60, 0, 2, seed=9, micro_batch=4, global_batch=8).load_state_dict(
            half_step.state_dict())


def _write_prepared(directory: Path, seq_len: int, shard_sizes: list[int]) -> np.ndarray:
    """A minimal prepared directory in the manifest format, holding sequence i = i * 1000 + position."""
    rows = np.arange(sum(shard_sizes))[:, None] * 1000 + np.arange(seq_len)[None, :]
    shards, start = [], 0
    for n, size in enumerate(shard_sizes):
        name = f"train-{n:05d}.bin"
        rows[start : start + size].astype("<u4").tofile(directory / name)
        shards.append(
            {
                "file": name,
                "split": "train",
                "first_sequence": start,
                "sequences": size,
                "bytes": size * seq_len * 4,
                "sha256": "",
            }
        )
        start += size
    tokenizer = {"spec": "t", "sha256": "", "vocab_size": 70000, "eos_token_id": 0}
    stats = {
        "documents": 1,
        "words": 1,
        "content_tokens": 1,
        "tokens": 1,
        "sequences": start,
        "packed_tokens": start * seq_len,
        "dropped_tokens": 0,
    }
    manifest = {
        "format_version": 1,
        "fingerprint": "",
        "seq_len": seq_len,
        "dtype": "uint32",
        "tokenizer": tokenizer,
        "data_format": "text",
        "text_field": None,
        "files": [],
        "seed": 0,
        "validation_fraction": 0.0,
        "split_rule": "",
        "packing": {},
        "splits": {"train": stats},
        "shards": shards,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return rows


def test_packed_dataset_reads_samples_across_shards_as_int64(tmp_path):
    rows = _write_prepared(tmp_path, seq_len=8, shard_sizes=[3, 5, 2])
    dataset = PackedDataset(tmp_path, split="train")
    assert len(dataset) == 10
    assert [dataset[i].tolist() for i in range(10)] == rows.tolist()
    assert dataset[-1].dtype == torch.int64 and dataset[-1].tolist() == rows[9].tolist()
    assert dataset.batch([9, 0, 4]).tolist() == rows[[9, 0, 4]].tolist()
    assert pickle.loads(pickle.dumps(dataset))[4].tolist() == rows[4].tolist()
    with pytest.raises(IndexError):
        dataset[10]


def test_packed_dataset_refuses_a_truncated_shard(tmp_path):
    _write_prepared(tmp_path, seq_len=8, shard_sizes=[3, 5])
    (tmp_path / "train-00001.bin").write_bytes(b"\0" * 10)
    with pytest.raises(
        PrepareError, match=r"train-00001\.bin: shard missing or truncated \(expected 160 bytes\); prepare again$"
    ):
        PackedDataset(tmp_path)
