"""Aspect-ratio grouped training batches for detection, sharded across DDP ranks."""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from datamodules.sampler import EpochBatchSampler, dist_rank_world, seeded_generator

__all__ = ["AspectRatioBatchSampler"]


class AspectRatioBatchSampler(EpochBatchSampler):
    """Batches that hold only landscape (``w/h ≥ 1``) or only portrait images, sharded across DDP ranks.

    Like torchvision's ``GroupedBatchSampler``: the epoch's order is a permutation of the data (seeded by
    ``(seed, epoch)``, identity without ``shuffle``); each orientation's images, in that order, are cut into batches
    of ``batch_size`` (the last one of each orientation may be smaller), and the batches are ordered by where their
    last image falls. Everything is tensor ops once per epoch; iterating only slices.

    Under DDP every rank builds the same batch list and rank ``r`` takes batches ``r, r + w, ...``. Every rank gets
    the same number of batches (``__len__``, as DDP needs): with ``drop_last`` the partial and tail batches are
    dropped; without it the largest batches are halved until the count divides by the world size, so the ranks'
    shares are disjoint and together cover the data once (only when there are fewer images than needed batches,
    e.g. ``batch_size=1`` with a world size not dividing the data, are a few first batches repeated).

    ``set_epoch`` (called by Lightning through ``sampler``, see ``EpochBatchSampler``) reshuffles deterministically.

    Args:
        aspect_ratios: ``w / h`` of every image.
        batch_size: images per batch on each rank.
        shuffle: shuffle every epoch.
        seed: with the epoch, fixes the order; the same on every rank.
        drop_last: drop the incomplete batches.
        rank, world_size: this process's shard (default: from ``torch.distributed``, else a single process).
    """

    def __init__(self, aspect_ratios: torch.Tensor | Sequence[float], batch_size: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.landscape = torch.as_tensor(aspect_ratios, dtype=torch.float64) >= 1
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        self.epoch = 0
        if len(self) == 0:
            raise ValueError(f"{len(self.landscape)} images give no batch of {batch_size} to each of "
                             f"{self.world_size} ranks (drop_last={drop_last})")

    def _num_batches(self) -> int:
        counts = (int(self.landscape.sum()), int((~self.landscape).sum()))
        if self.drop_last:
            return sum(c // self.batch_size for c in counts)
        return sum(-(-c // self.batch_size) for c in counts)

    def __len__(self) -> int:
        if self.drop_last:
            return self._num_batches() // self.world_size
        return -(-self._num_batches() // self.world_size)

    def epoch_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(items, sizes)`` of the whole epoch (all ranks): batch ``b`` is the next ``sizes[b]`` entries of ``items``."""
        n, bs = len(self.landscape), self.batch_size
        order = torch.randperm(n, generator=seeded_generator(self.seed, self.epoch)) if self.shuffle else torch.arange(n)
        land = self.landscape[order].long()
        position = torch.where(land.bool(), torch.cumsum(land, 0), torch.cumsum(1 - land, 0)) - 1
        key = (position // bs) * 2 + land  # one key per (orientation, batch)
        if self.drop_last:
            full = torch.tensor([int((1 - land).sum()) // bs, int(land.sum()) // bs])
            keep = position // bs < full[land]
            order, key = order[keep], key[keep]
        # A batch is ordered by its last image's position; its items stay in epoch order.
        completion = torch.full((int(key.max()) + 1 if len(key) else 0,), -1, dtype=torch.int64)
        completion.scatter_reduce_(0, key, torch.arange(len(key)), reduce="amax")
        items = order[torch.argsort(completion[key], stable=True)]
        present = torch.nonzero(completion >= 0).flatten()
        present = present[torch.argsort(completion[present])]
        sizes = torch.bincount(key, minlength=len(completion))[present]
        world = self.world_size
        if self.drop_last:
            sizes = sizes[: len(sizes) // world * world]
            items = items[: int(sizes.sum())]
        else:
            for _ in range((-len(sizes)) % world):  # halve the largest batch (≤ world - 1 times)
                largest = int(torch.argmax(sizes))
                if sizes[largest] < 2:  # fewer images than batches needed: repeat the first batches
                    extra = (-len(sizes)) % world
                    items = torch.cat([items, items[: int(sizes[:extra].sum())]])
                    sizes = torch.cat([sizes, sizes[:extra]])
                    break
                half = int(sizes[largest]) // 2
                sizes = torch.cat([sizes[:largest], torch.tensor([int(sizes[largest]) - half, half]), sizes[largest + 1:]])
        return items, sizes

    def epoch_batches(self) -> Iterator[list[int]]:
        items, sizes = self.epoch_table()
        items_list, starts = items.tolist(), (torch.cumsum(sizes, 0) - sizes).tolist()
        sizes_list = sizes.tolist()
        for b in range(self.rank, len(sizes_list), self.world_size):
            yield items_list[starts[b]: starts[b] + sizes_list[b]]
