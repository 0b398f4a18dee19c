"""The zoo's batch samplers: every epoch's batches can be rebuilt from the epoch and the sampler's seed, every rank
gets its own share, and a run resumed from a checkpoint written in the middle of an epoch continues with that
epoch's next batch.

* ``RandomBatchSampler``: shuffled batches over the whole data set, ``DataLoader(shuffle=True)``'s batches made
  resumable and DDP-sharded (the plain loaders of ``ZooDataModule``).
* ``ShardedRandomBatchSampler``: exactly ``num_batches`` random batches per epoch, for streams that must stay in
  lock-step (labeled/unlabeled, source/target, A/B; ``ZooDataModule.two_stream_loader``).
* ``BalancedClassSampler``: ``P`` classes × ``K`` images, the ``PK`` batch of re-ID's batch-hard triplet loss
  (Hermans et al. 2017) and API-Net's ``BalancedBatchSampler`` (Zhuang et al. 2020, 30 × 4 on CUB): a loss that mines
  a same-class partner for every image needs at least two images of each class in the batch.
* ``ClassBalancedBatchSampler``: plain batches in which every class appears equally often.

The samplers are DDP-aware on their own: every rank builds the same epoch from ``(seed, epoch)`` and takes its
share, and every rank gets the same number of batches (otherwise one rank would wait forever in a collective).
Lightning cannot wrap a batch sampler in a ``DistributedSampler`` anyway; the zoo's CLI sets
``trainer.use_distributed_sampler: false`` and ``ZooDataModule`` refuses DDP without it.

Resuming (``EpochBatchSampler``): Lightning saves the position of a *stateful* training loader in its checkpoints
(``state_dict`` / ``load_state_dict``, its ``_Stateful`` protocol) and restores it before the loader is iterated.
``ResumableDataLoader`` (``datamodules.base``) reports ``(epoch, batches served)``; ``resume`` makes the sampler's
next iteration be that epoch with its first batches skipped. Without this, Lightning resumes its step counters but
the loader restarts the epoch, serving its first batches again and never the rest.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "EpochBatchSampler", "RandomBatchSampler", "BalancedClassSampler", "ClassBalancedBatchSampler",
    "ShardedRandomBatchSampler", "dist_rank_world", "seeded_generator",
]


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


class EpochBatchSampler(Sampler[list[int]]):
    """Base of the zoo's batch samplers: ``epoch_batches()`` gives this rank's batches of ``self.epoch``.

    ``set_epoch(epoch)`` selects the epoch. Lightning's fit loop calls ``set_epoch`` on ``loader.sampler`` and on
    ``loader.batch_sampler.sampler``, never on the batch sampler itself
    (``lightning.fabric.utilities.data._set_sampler_epoch``); without a ``sampler`` attribute a batch sampler would
    replay epoch 0's batches in every epoch. ``sampler`` is therefore the batch sampler itself.

    ``resume(epoch, batches_done, state)`` makes the next iteration serve ``epoch`` without its first
    ``batches_done`` batches. The skipped batches are rebuilt, not drawn anew, so the rest is exactly what the
    interrupted run would have served; ``state`` is what ``epoch_state()`` returned then, for a sampler whose epoch
    depends on more than ``(seed, epoch)``. A later ``set_epoch`` to another epoch cancels the resume.
    """

    epoch: int = 0
    _resume: Optional[tuple[int, int, dict[str, Any]]] = None
    #: the epoch and the number of skipped batches of the iteration in progress (read by ``ResumableDataLoader``)
    iteration: tuple[int, int] = (0, 0)

    @property
    def sampler(self) -> "EpochBatchSampler":
        return self

    def set_epoch(self, epoch: int) -> None:
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int, state: Optional[dict[str, Any]] = None) -> None:
        self._resume = (epoch, batches_done, dict(state or {}))
        self.epoch = epoch

    def epoch_batches(self) -> Iterator[list[int]]:
        """This rank's batches of ``self.epoch``, in order."""
        raise NotImplementedError(f"{type(self).__name__} must implement epoch_batches()")

    def begin_epoch(self) -> None:
        """Called when a fresh (not a resumed) epoch starts: draw what the epoch needs beyond ``(seed, epoch)``."""

    def epoch_state(self) -> dict[str, Any]:
        """What, beyond ``(seed, epoch)``, rebuilds the epoch in progress."""
        return {}

    def load_epoch_state(self, state: dict[str, Any]) -> None:
        """Restore ``epoch_state()`` (before a resumed iteration)."""

    def __iter__(self) -> Iterator[list[int]]:
        skip = 0
        if self._resume is not None:
            (self.epoch, skip, state), self._resume = self._resume, None
            self.load_epoch_state(state)
        else:
            self.begin_epoch()
        self.iteration = (self.epoch, skip)
        for index, batch in enumerate(self.epoch_batches()):
            if index >= skip:
                yield batch


class RandomBatchSampler(EpochBatchSampler):
    """Shuffled batches of ``batch_size`` covering ``num_items`` once per epoch, the last batch smaller.

    One process without a ``seed``: the epoch's permutation comes from a seed drawn from torch's global RNG when the
    epoch starts, exactly as ``DataLoader(shuffle=True)``'s ``RandomSampler`` draws it, so a run gets the very batches
    it got with a plain shuffled loader. The seed is part of ``epoch_state``, so a resumed epoch replays its
    permutation (and ``zoo.callbacks.LastCheckpoint`` restores the global RNG for the epochs after).

    Several processes, or a ``seed``: the permutation comes from ``seed + epoch`` (default ``PL_GLOBAL_SEED``, the
    run's ``seed_everything``, as Lightning seeds its ``DistributedSampler``), is padded with its own first items to a
    multiple of the world size, and rank ``r`` takes items ``r, r + w, ...``: Lightning's ``DistributedSampler``
    followed by batching, so every rank gets the same number of batches.

    Args:
        num_items: data set size.
        batch_size: items per batch on each rank.
        seed: fixes the permutations with the epoch instead of the global RNG.
        rank, world_size: this process's shard (default: from ``torch.distributed``, else a single process).
    """

    def __init__(self, num_items: int, batch_size: int, seed: Optional[int] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> None:
        if num_items < 1 or batch_size < 1:
            raise ValueError(f"need num_items ≥ 1 and batch_size ≥ 1, got {num_items}, {batch_size}")
        self.num_items, self.batch_size = num_items, batch_size
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        if seed is None and self.world_size > 1:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.seed = seed
        self.epoch = 0
        self._epoch_seed: Optional[int] = None

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.num_items / self.world_size) / self.batch_size)

    def begin_epoch(self) -> None:
        if self.seed is None:
            # RandomSampler's own draw, at the same moment: when the epoch's first batch is asked for.
            self._epoch_seed = int(torch.empty((), dtype=torch.int64).random_().item())
        else:
            self._epoch_seed = self.seed + self.epoch

    def epoch_state(self) -> dict[str, Any]:
        return {"epoch_seed": self._epoch_seed}

    def load_epoch_state(self, state: dict[str, Any]) -> None:
        self._epoch_seed = state.get("epoch_seed")
        if self._epoch_seed is None:
            self.begin_epoch()

    def epoch_batches(self) -> Iterator[list[int]]:
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self._epoch_seed))
        if self.world_size > 1:
            total = math.ceil(self.num_items / self.world_size) * self.world_size
            order = order.repeat(math.ceil(total / self.num_items))[:total][self.rank :: self.world_size]
        for batch in order.split(self.batch_size):
            yield batch.tolist()


class BalancedClassSampler(EpochBatchSampler):
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

    def _epoch_table(self) -> torch.Tensor:
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

    def epoch_batches(self) -> Iterator[list[int]]:
        yield from self._epoch_table()[:, self.rank].tolist()


class ClassBalancedBatchSampler(EpochBatchSampler):
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

    def __len__(self) -> int:
        return len(self.labels) // (self.batch_size * self.world_size)

    def epoch_batches(self) -> Iterator[list[int]]:
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


class ShardedRandomBatchSampler(EpochBatchSampler):
    """Exactly ``num_batches`` random batches of ``batch_size`` per epoch, sharded across DDP ranks.

    Semi-supervised training draws a labeled and an unlabeled batch at every step from sets of very different sizes;
    giving both streams the same ``num_batches`` keeps them in lock-step without Lightning cycling the shorter one.

    The epoch's index stream is built identically on every rank from ``(seed, epoch)``: one fresh permutation of
    ``range(num_items)`` per pass (seeded by ``(seed, epoch, pass)``), concatenated and cut into steps of
    ``batch_size × world_size``; rank ``r`` takes the ``r``-th slice of every step. So ranks never share an item
    within a step, within one pass every item is used once, and every rank gets the same number of batches.

    A step that straddles two passes (a 50-image labeled set in batches of 16 does every few steps) would hold the
    items both ends have in common twice; the head of the new pass swaps them with later items of that pass, so
    when ``num_items ≥ batch_size × world_size`` every step, hence every batch, holds distinct items. With fewer
    items than a step that is impossible and a step (possibly a batch) repeats items across the pass boundary.

    The work is one ``randperm`` per pass (a loop over passes, never over samples).

    Args:
        num_items: dataset size.
        batch_size: items per batch on each rank.
        num_batches: batches per epoch on each rank (``__len__``).
        seed: with the epoch (``set_epoch``), fixes the stream; the same on every rank.
        rank, world_size: this process's shard (default: from ``torch.distributed``, else a single process).
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        num_batches: int,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        if num_items < 1 or batch_size < 1 or num_batches < 1:
            raise ValueError(f"need num_items, batch_size, num_batches ≥ 1, got {num_items}, {batch_size}, {num_batches}")
        self.num_items, self.batch_size, self.num_batches, self.seed = num_items, batch_size, num_batches, seed
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def _epoch_stream(self) -> torch.Tensor:
        """``(num_batches, world_size, batch_size)`` indices of the whole epoch, the same on every rank."""
        n, step = self.num_items, self.batch_size * self.world_size
        needed = step * self.num_batches
        passes: list[torch.Tensor] = []
        filled = 0
        for p in range(-(-needed // n)):
            perm = torch.randperm(n, generator=seeded_generator(self.seed, self.epoch, p))
            tail = filled % step  # items of the previous pass already in the step that this pass completes
            if tail and n >= step:
                # Swap the new pass's head items that the step already holds with later, unheld items of the pass.
                held = torch.zeros(n, dtype=torch.bool)
                held[passes[-1][-tail:]] = True
                head = step - tail
                clash = torch.nonzero(held[perm[:head]]).flatten()
                free = head + torch.nonzero(~held[perm[head:]]).flatten()[: len(clash)]
                perm[clash], perm[free] = perm[free], perm[clash]  # advanced indexing copies the right side
            passes.append(perm)
            filled += n
        return torch.cat(passes)[:needed].view(self.num_batches, self.world_size, self.batch_size)

    def epoch_batches(self) -> Iterator[list[int]]:
        yield from self._epoch_stream()[:, self.rank].tolist()
