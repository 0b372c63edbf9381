"""Training samples from prepared shards, and a sampler that is exactly resumable across ranks.

    dataset = PackedDataset(prepared_dir, split="train")        # sample i: LongTensor [seq_len]
    sampler = DistributedResumableSampler(len(dataset), rank, world_size, seed, micro_batch, global_batch)
    sampler.load_state_dict(checkpoint["sampler"])                # when resuming
    for indices in sampler:                                       # the rest of the current epoch
        input_ids = dataset.batch(indices)                        # [micro_batch, seq_len]; labels = input_ids
        ...
        checkpoint["sampler"] = sampler.state_dict()              # counts the batches handed out so far

Order: epoch e visits the samples in `permutation(seed, e)`, a pure function of the seed and the epoch
(numpy's PCG64 seeded with SeedSequence([seed, e])), so the state is two integers and no RNG state. Optimizer
step k of an epoch takes entries [k·G, (k+1)·G) of that order (G = global_batch sequences); within it, micro-step
m hands rank r the block of `micro_batch` at k·G + m·world_size·micro_batch + r·micro_batch. The last
`num_samples mod G` entries of each epoch's order are skipped (a different few each epoch). So the samples of
every optimizer step depend on the seed and G only, not on how the world is laid out.

Exact resume: `state_dict()` is `{epoch, consumed_samples}` (plus what it was built for); after loading it a
sampler yields exactly the batches an uninterrupted one yields from that point. That holds when the batches
were taken one at a time (`DataLoader(num_workers=0)` or `dataset.batch`); a prefetching DataLoader draws
indices ahead of the training step, so its sampler state would run ahead. A state saved at an optimizer-step
boundary loads under any world size and micro-batch with the same G: the next steps take the same samples.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from runtime.prepare import load_manifest
from runtime.prepare.sources import PrepareError

IGNORE_INDEX = -100  # what transformers' loss skips (runtime.train.loss)

__all__ = ["DistributedResumableSampler", "MixtureDataset", "MixtureSampler", "PackedDataset", "PreferencePairs"]


class PackedDataset(Dataset):
    """The packed sequences of one split of a prepared directory, read through memory maps, opened lazily."""

    def __init__(self, prepared_dir: str | os.PathLike, split: str = "train"):
        self.manifest = load_manifest(prepared_dir)
        if split not in self.manifest.splits:
            raise PrepareError(
                f"no split {split!r}; the manifest has {', '.join(self.manifest.splits)}", str(prepared_dir)
            )
        self.split, self.seq_len, self.prepared_dir = split, self.manifest.seq_len, str(prepared_dir)
        self._paths, self._mask_paths = [], []
        counts = []
        masks = self.manifest.loss_masks_for(split)
        self.has_loss_mask = self.manifest.records is not None
        for shard, mask in zip(self.manifest.shards_for(split), masks if self.has_loss_mask else
                               [None] * len(self.manifest.shards_for(split)), strict=True):
            for info in (shard, mask) if mask is not None else (shard,):
                path = os.path.join(prepared_dir, info.file)
                if not os.path.isfile(path) or os.path.getsize(path) != info.bytes:
                    raise PrepareError(f"shard missing or truncated (expected {info.bytes:,} bytes); prepare again",
                                       path)
            self._paths.append(os.path.join(prepared_dir, shard.file))
            if mask is not None:
                self._mask_paths.append(os.path.join(prepared_dir, mask.file))
            counts.append(shard.sequences)
        self._starts = np.cumsum([0, *counts])
        self._maps: list[np.memmap] | None = None
        self._mask_maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        index %= len(self)
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return torch.from_numpy(self._shards()[shard][index - self._starts[shard]].astype(np.int64))

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """Samples `indices` stacked: LongTensor [len(indices), seq_len]."""
        if not len(indices):
            return torch.empty(0, self.seq_len, dtype=torch.int64)
        return torch.stack([self[int(i)] for i in indices])

    def labels(self, indices: Sequence[int]) -> torch.Tensor:
        """sft: the samples' labels [len(indices), seq_len]: the token where the loss mask is 1 (an assistant
        token), IGNORE_INDEX (-100) elsewhere. The loss shifts them: position t is scored on label t + 1."""
        if not self.has_loss_mask:
            raise PrepareError("the prepared data holds no loss mask (prepared from documents, not sft records)",
                               self.prepared_dir)
        if self._mask_maps is None:
            self._mask_maps = [np.memmap(p, dtype=np.uint8, mode="r").reshape(-1, self.seq_len)
                               for p in self._mask_paths]
        rows = []
        for i in indices:
            index = int(i) % len(self)
            shard = int(np.searchsorted(self._starts, index, side="right")) - 1
            rows.append(torch.from_numpy(self._mask_maps[shard][index - self._starts[shard]].astype(np.bool_)))
        tokens = self.batch(indices)
        if not rows:
            return tokens
        return torch.where(torch.stack(rows), tokens, torch.full_like(tokens, IGNORE_INDEX))

    def __getstate__(self) -> dict:  # DataLoader workers reopen the maps instead of copying them
        return {**self.__dict__, "_maps": None, "_mask_maps": None}

    def _shards(self) -> list[np.memmap]:
        if self._maps is None:
            dtype = np.dtype(self.manifest.dtype).newbyteorder("<")
            self._maps = [np.memmap(p, dtype=dtype, mode="r").reshape(-1, self.seq_len) for p in self._paths]
        return self._maps


class PreferencePairs:
    """The preference pairs of a split prepared with layout "pairs": pair i is sequence 2i (prompt + chosen) and
    2i + 1 (prompt + rejected), each one record padded to seq_len; a batch of b pairs is 2b rows, the b chosen
    first."""

    def __init__(self, sequences: PackedDataset):
        records = sequences.manifest.records or {}
        if records.get("settings", {}).get("layout") != "pairs":
            raise PrepareError("the prepared data holds no preference pairs (prepared from another format); prepare "
                               "again with this plan", sequences.prepared_dir)
        self.sequences, self.seq_len, self.prepared_dir = sequences, sequences.seq_len, sequences.prepared_dir

    def __len__(self) -> int:
        return len(self.sequences) // 2

    def _rows(self, indices: Sequence[int]) -> list[int]:
        pairs = [int(i) % len(self) for i in indices]
        return [2 * i for i in pairs] + [2 * i + 1 for i in pairs]

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """The pairs' sequences: LongTensor [2·len(indices), seq_len], chosen rows then rejected rows."""
        return self.sequences.batch(self._rows(indices))

    def labels(self, indices: Sequence[int]) -> torch.Tensor:
        """Their labels: each response's tokens (and its EOS), IGNORE_INDEX on the prompt and the padding."""
        return self.sequences.labels(self._rows(indices))


class DistributedResumableSampler:
    """Yields this rank's micro-batches (lists of sample indices) for the rest of the current epoch."""

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, micro_batch: int,
                 global_batch: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        if micro_batch < 1:
            raise ValueError(f"micro_batch {micro_batch} must be at least 1")
        if global_batch % (world_size * micro_batch):
            raise ValueError(f"global_batch {global_batch} is not a multiple of world_size {world_size} × "
                             f"micro_batch {micro_batch}")
        if num_samples < global_batch:
            raise ValueError(f"{num_samples} samples cannot fill one optimizer step of {global_batch} sequences")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.micro_batch, self.global_batch = seed, micro_batch, global_batch
        self.epoch = 0
        self.consumed_samples = 0  # of this epoch's order, by all ranks together
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def step_samples(self) -> int:
        """Samples one micro-step takes, all ranks together."""
        return self.world_size * self.micro_batch

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch."""
        return self.num_samples // self.global_batch

    def __len__(self) -> int:
        """Micro-batches left in the current epoch."""
        return (self.steps_per_epoch * self.global_batch - self.consumed_samples) // self.step_samples

    def __iter__(self) -> Iterator[list[int]]:
        if len(self) == 0:
            self.epoch, self.consumed_samples = self.epoch + 1, 0
        while True:
            order = self.permutation(self.epoch)
            start = self.consumed_samples + self.rank * self.micro_batch
            batch = order[start : start + self.micro_batch].tolist()
            self.consumed_samples += self.step_samples  # before the yield: the state counts batches handed out
            last = len(self) == 0
            if last:
                self.epoch, self.consumed_samples = self.epoch + 1, 0
            yield batch
            if last:
                return

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of `epoch`: a function of (seed, epoch) only."""
        if self._order is None or self._order[0] != epoch:
            generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed % 2**64, epoch])))
            self._order = (epoch, generator.permutation(self.num_samples))
        return self._order[1]

    def state_dict(self) -> dict:
        """The position as plain integers: epoch and samples of its order consumed, plus what it was built for."""
        return {
            "epoch": self.epoch,
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch": self.global_batch,
            "world_size": self.world_size,
            "micro_batch": self.micro_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continues from `state`, which may come from another world size or micro-batch (same global batch)."""
        for key in ("seed", "num_samples", "global_batch"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key} {state[key]}, this sampler has {getattr(self, key)}"
                )
        consumed = state["consumed_samples"]
        if not 0 <= consumed <= self.num_samples or consumed % self.step_samples:
            raise ValueError(f"consumed_samples {consumed} is not a micro-step boundary of this sampler "
                             f"({self.step_samples} samples each) within [0, {self.num_samples}]")
        self.epoch, self.consumed_samples = int(state["epoch"]), int(consumed)


class MixtureDataset(Dataset):
    """Several sources' packed sequences as one index space: source s holds indices [offsets[s], offsets[s+1])."""

    def __init__(self, sources: Sequence[PackedDataset]):
        seq_lens = {d.seq_len for d in sources}
        if len(seq_lens) != 1:
            raise ValueError(f"sources packed at different seq_len: {sorted(seq_lens)}")
        self.sources, self.seq_len = list(sources), seq_lens.pop()
        self.offsets = np.cumsum([0, *(len(d) for d in sources)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def source_of(self, index: int) -> int:
        """Which source global `index` belongs to."""
        return int(np.searchsorted(self.offsets, index, side="right")) - 1

    def __getitem__(self, index: int) -> torch.Tensor:
        s = self.source_of(index)
        return self.sources[s][index - int(self.offsets[s])]

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """Samples `indices` stacked: LongTensor [len(indices), seq_len]."""
        if not len(indices):
            return torch.empty(0, self.seq_len, dtype=torch.int64)
        return torch.stack([self[int(i)] for i in indices])


class MixtureSampler:
    """Yields this rank's micro-batches (lists of indices into a `MixtureDataset`) forever, drawing each source's
    sequences at its share of the stream.

    The stream is one global sequence of positions, laid out over ranks and micro-steps exactly as
    `DistributedResumableSampler` lays out its order, so it does not depend on the world size. Position p takes its
    source by smooth weighted round robin over integer weights (each source's credit grows by its weight, the
    largest credit is drawn and pays back the total; ties go to the earlier source): deterministic, and over any n
    positions a source's count is within about one of n × share. A source's d-th draw is entry d mod N of
    `permutation(seed, source, d // N)`, numpy's PCG64 seeded with SeedSequence([seed, source, epoch]): every
    source runs through its own epochs. The state is the position, the credits and the draws: plain integers.
    """

    WEIGHT_SCALE = 1 << 20  # shares become integer weights at this resolution

    def __init__(self, source_sizes: Sequence[int], shares: Sequence[float], rank: int, world_size: int, seed: int,
                 micro_batch: int, global_batch: int):
        if len(source_sizes) != len(shares) or not source_sizes:
            raise ValueError("one share per source, at least one source")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        if global_batch % (world_size * micro_batch):
            raise ValueError(f"global_batch {global_batch} is not a multiple of world_size {world_size} × "
                             f"micro_batch {micro_batch}")
        empty = [i for i, n in enumerate(source_sizes) if n < 1]
        if empty:
            raise ValueError(f"source {empty[0]} holds no training sequence")
        self.sizes = [int(n) for n in source_sizes]
        self.weights = [max(1, round(s * self.WEIGHT_SCALE)) for s in shares]
        self.offsets = np.cumsum([0, *self.sizes])
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.micro_batch, self.global_batch = micro_batch, global_batch
        self.position = 0
        self.credits = [0] * len(self.sizes)
        self.draws = [0] * len(self.sizes)
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def step_samples(self) -> int:
        """Samples one micro-step takes, all ranks together."""
        return self.world_size * self.micro_batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            block = [self._next_index() for _ in range(self.step_samples)]  # every rank walks the whole block
            start = self.rank * self.micro_batch
            yield block[start : start + self.micro_batch]

    def _next_index(self) -> int:
        total = sum(self.weights)
        for s, w in enumerate(self.weights):
            self.credits[s] += w
        source = max(range(len(self.weights)), key=lambda s: (self.credits[s], -s))
        self.credits[source] -= total
        draw = self.draws[source]
        self.draws[source] += 1
        self.position += 1
        epoch, entry = divmod(draw, self.sizes[source])
        return int(self.offsets[source]) + int(self.permutation(source, epoch)[entry])

    def permutation(self, source: int, epoch: int) -> np.ndarray:
        """The order of `source`'s sequences in its `epoch`: a function of (seed, source, epoch) only."""
        cached = self._orders.get(source)
        if cached is None or cached[0] != epoch:
            seeds = np.random.SeedSequence([self.seed % 2**64, source, epoch])
            cached = (epoch, np.random.Generator(np.random.PCG64(seeds)).permutation(self.sizes[source]))
            self._orders[source] = cached
        return cached[1]

    def state_dict(self) -> dict:
        """The position in the stream, the credits and each source's draws, plus what it was built for."""
        return {"kind": "mixture", "position": self.position, "credits": list(self.credits),
                "draws": list(self.draws), "seed": self.seed, "sizes": list(self.sizes),
                "weights": list(self.weights), "global_batch": self.global_batch, "world_size": self.world_size,
                "micro_batch": self.micro_batch}

    def load_state_dict(self, state: dict) -> None:
        """Continues from `state`, which may come from another world size or micro-batch (same global batch)."""
        for key in ("seed", "sizes", "weights", "global_batch"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key} {state.get(key)}, this sampler has "
                                 f"{getattr(self, key)}")
        if state["position"] % self.step_samples:
            raise ValueError(f"position {state['position']} is not a micro-step boundary of this sampler "
                             f"({self.step_samples} samples each)")
        self.position, self.credits, self.draws = int(state["position"]), list(state["credits"]), list(state["draws"])
