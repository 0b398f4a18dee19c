"""Batch samplers shared by families whose losses compare images within a batch (re-ID, fine-grained, few-shot).

``BalancedClassSampler`` builds every batch from ``P`` classes × ``K`` images, the ``PK`` batch of re-ID's batch-hard
triplet loss (Hermans et al. 2017) and API-Net's ``BalancedBatchSampler`` (Zhuang et al. 2020, 30 × 4 on CUB): a
loss that mines a same-class partner for every image needs at least two images of each class in the batch.

Both samplers here are DDP-aware on their own: every rank builds the same epoch from ``(seed, epoch)`` and takes its
share, and every rank gets the same number of batches (otherwise one rank would wait forever in a collective). Use
them with ``trainer.use_distributed_sampler: false``; Lightning cannot wrap a batch sampler in a
``DistributedSampler`` anyway. Lightning calls ``set_epoch`` on a loader's ``batch_sampler`` at every epoch.
"""

from __future__ import annotations

import warnings
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["BalancedClassSampler", "ClassBalancedBatchSampler", "dist_rank_world", "seeded_generator"]


def dist_rank_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """``(rank, world_size)``: the given values, else those of the initialised process group, else ``(0, 1)``."""
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return rank, world_size


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from an int tuple, identical in every process."""
    # Python's hash of an int tuple is deterministic across processes (no hash randomisation for ints).
    return torch.Generator().manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)


class BalancedClassSampler(Sampler[list[int]]):
    """Batches of ``classes_per_batch`` distinct classes × ``images_per_class`` distinct images each.

    Every step draws ``world_size × classes_per_batch`` distinct classes uniformly (so ranks hold disjoint classes
    and each rank can mine its pairs locally); rank ``r`` takes the ``r``-th group. Each class hands out its images
    ``K`` at a time from a shuffled list and reshuffles when the list runs out (as API-Net's sampler does), so within
    one pass every image of a class is used once, and a batch never holds the same image twice. Classes with fewer
    than ``K`` images cannot fill their slot and are left out, with a warning.

    An epoch has ``⌊eligible images / (P·K·world_size)⌋`` steps, about one pass over the data. Everything is built
    with tensor ops when the epoch starts (about 0.1 s for a million images).

    Args:
        labels: class id of every dataset item.
        classes_per_batch: ``P``, classes per batch on each rank.
        images_per_class: ``K``, images per class.
        seed: with the epoch (``set_epoch``), fixes the batches; the same on every rank.
        rank, world_size: this process's shard (default: from ``torch.distributed``, else a single process).
    """

    def __init__(
        self,
        labels: torch.Tensor | Sequence[int],
        classes_per_batch: int,
        images_per_class: int,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        if classes_per_batch < 1 or images_per_class < 1:
            raise ValueError(f"need classes_per_batch ≥ 1 and images_per_class ≥ 1, got {classes_per_batch}, {images_per_class}")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        self.classes_per_batch, self.images_per_class, self.seed = classes_per_batch, images_per_class, seed
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        self.epoch = 0

        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        eligible = counts >= images_per_class
        if not bool(eligible.all()):
            warnings.warn(
                f"BalancedClassSampler: {int((~eligible).sum())} of {len(classes)} classes have fewer than "
                f"{images_per_class} images and are never sampled", stacklevel=2,
            )
        needed = classes_per_batch * self.world_size
        if int(eligible.sum()) < needed:
            raise ValueError(
                f"BalancedClassSampler needs {needed} classes with ≥ {images_per_class} images per step "
                f"({classes_per_batch} per batch × {self.world_size} processes) but the data has {int(eligible.sum())}"
            )
        # Dataset indices of eligible items, grouped by (eligible) class: class c owns items[start[c] : start[c] + count[c]].
        new_id = torch.cumsum(eligible, 0) - 1
        keep = eligible[inverse]
        self._class_of_item = new_id[inverse[keep]]  # class of each kept item, in kept order
        self._dataset_index = torch.nonzero(keep).flatten()
        self._counts = counts[eligible]
        self._chunks = self._counts // images_per_class  # K-image slots per pass through a class
        self._num_items = int(self._counts.sum())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._num_items // (self.classes_per_batch * self.images_per_class * self.world_size)

    def _choose_classes(self, steps: int, generator: torch.Generator) -> torch.Tensor:
        """``(steps, world·P)`` distinct classes per step, by the top-k of uniform keys (a uniform subset)."""
        num_classes, per_step = len(self._counts), self.classes_per_batch * self.world_size
        chosen = torch.empty(steps, per_step, dtype=torch.int64)
        rows = max(1, (1 << 22) // num_classes)  # bound the key matrix to ~16 MB
        for start in range(0, steps, rows):
            keys = torch.rand(min(rows, steps - start), num_classes, generator=generator)
            chosen[start : start + rows] = keys.topk(per_step, dim=1).indices
        return chosen

    def _epoch_batches(self) -> torch.Tensor:
        """``(steps, world_size, P·K)`` dataset indices of the whole epoch, the same on every rank."""
        k = self.images_per_class
        generator = seeded_generator(self.seed, self.epoch)
        steps = len(self)
        slots = self._choose_classes(steps, generator).flatten()  # step-major: earlier steps use earlier images

        # The n-th time a class is drawn it takes chunk n of its stream: pass n // chunks, slot n % chunks of that pass.
        order = torch.argsort(slots, stable=True)
        sorted_slots = slots[order]
        occurrence = torch.empty_like(slots)
        occurrence[order] = torch.arange(len(slots)) - torch.searchsorted(sorted_slots, sorted_slots)
        chunks = self._chunks[slots]
        passes, chunk = occurrence // chunks, occurrence % chunks

        items = torch.empty(len(slots), k, dtype=torch.int64)
        offsets = torch.arange(k)
        # One shuffle per pass over the classes that reach it: the loop runs over passes (usually 1–2), not samples.
        for pass_index in range(int(passes.max()) + 1 if len(slots) else 0):
            in_pass = passes == pass_index
            reaching = torch.zeros(len(self._counts), dtype=torch.bool)
            reaching[slots[in_pass]] = True
            members = torch.nonzero(reaching[self._class_of_item]).flatten()
            # Sorting by class + a uniform key in [0, 1) groups the classes in order and shuffles inside each.
            keys = self._class_of_item[members] + torch.rand(len(members), generator=generator, dtype=torch.float64)
            shuffled = members[torch.argsort(keys)]
            start = torch.cumsum(self._counts * reaching, 0) - self._counts * reaching
            position = start[slots[in_pass]] + chunk[in_pass] * k
            items[in_pass] = self._dataset_index[shuffled[position[:, None] + offsets]]
        return items.view(steps, self.world_size, self.classes_per_batch * k)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._epoch_batches()[:, self.rank].tolist()


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Plain batches (pre-training, e.g. Baseline/Baseline++) in which every class appears equally often.

    Each epoch shuffles the images of every class and interleaves the classes round-robin (class order shuffled per
    round), so any ``num_classes`` consecutive items hold one image of each class that still has images left. The
    stream is cut into batches and batch ``b`` goes to rank ``b % world_size``; every rank gets the same number of
    batches (the tail is dropped), as DDP needs.
    """

    def __init__(
        self,
        labels: torch.Tensor | Sequence[int],
        batch_size: int,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels) // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        g = seeded_generator(self.seed, self.epoch)  # the same stream on every rank; ranks take disjoint batches
        n = len(self.labels)
        shuffled = torch.randperm(n, generator=g)
        labels = self.labels[shuffled]
        # position of each item within its class (after shuffling), then a random class order inside each round
        by_class = torch.argsort(labels, stable=True)
        sorted_labels = labels[by_class]
        first = torch.searchsorted(sorted_labels, sorted_labels, right=False)
        within = torch.empty(n, dtype=torch.int64)
        within[by_class] = torch.arange(n) - first
        class_rank = torch.randperm(int(self.labels.max()) + 1, generator=g)[labels]
        stream = shuffled[torch.argsort(within * (int(self.labels.max()) + 1) + class_rank)]
        batches = stream[: len(self) * self.world_size * self.batch_size].view(-1, self.batch_size)
        for batch in batches[self.rank :: self.world_size]:
            yield batch.tolist()
