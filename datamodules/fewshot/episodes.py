"""The episode contract of the few-shot family, and the sampler and collate that produce it.

Every few-shot method in ``zoo/fewshot`` reads the same episode: an ``Episode(support, query, classes)`` with
``support: (N, K, C, H, W)``, ``query: (N, Q, C, H, W)`` and the split's class ids ``classes: (N,)``. Row ``i`` of
``support`` and ``query`` is episode class ``i``, so the query labels are implicit:
``arange(N).repeat_interleave(Q)`` (the class-major layout of CloserLook's ``SetDataset``).

``EpisodicBatchSampler`` draws all of its randomness in the main process from an explicit ``torch.Generator`` (never
from worker RNGs, which duplicate episodes across workers: ProtoNet's loader comment) and shards episodes across DDP
ranks itself:

- training episodes are drawn from a generator seeded with ``(seed, epoch, rank)``, so ranks see different episodes
  and ``set_epoch`` (Lightning calls it every epoch, see ``EpochBatchSampler``) gives new ones;
- validation/test episodes are a fixed list, episode ``e`` drawn from a generator seeded with ``(seed, e)`` only, and
  rank ``r`` runs ``episodes[r::world_size]``: the union over ranks is the same 600 episodes for any world size, so
  numbers are reproducible (CloserLook draws new validation episodes every epoch, which makes selection noisy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.sampler import EpochBatchSampler, dist_rank_world, seeded_generator

__all__ = ["Episode", "EpisodeSetting", "EpisodicBatchSampler", "EpisodeCollate"]


class Episode(NamedTuple):
    """One few-shot task; row ``i`` of ``support``/``query`` holds episode class ``i`` (global id ``classes[i]``)."""

    support: torch.Tensor  # (N, K, C, H, W)
    query: torch.Tensor  # (N, Q, C, H, W)
    classes: torch.Tensor  # (N,)


@dataclass(frozen=True)
class EpisodeSetting:
    """An episode shape and how many episodes to draw (per epoch for training; in total for evaluation)."""

    n_way: int = 5
    k_shot: int = 1
    n_query: int = 15
    episodes: int = 600

    @property
    def name(self) -> str:
        return f"{self.n_way}way{self.k_shot}shot"


class EpisodicBatchSampler(EpochBatchSampler):
    """Yields episodes as lists of ``n_way · (k_shot + n_query)`` dataset indices, class-major.

    For episode class ``j`` the indices ``[j·(K+Q), j·(K+Q)+K)`` are its support, the next ``Q`` its queries; images
    are drawn without replacement within a class, so support and query never share an image. Classes with fewer than
    ``K + Q`` images are left out (with a warning).

    Args:
        labels: class id of every dataset item.
        n_way, k_shot, n_query: the episode shape.
        episodes: training: episodes per epoch over all ranks (each rank draws ``episodes // world_size``);
            ``fixed``: the total number of evaluation episodes, split over ranks as ``[rank::world_size]``.
        seed: base seed.
        fixed: evaluation mode (the same episodes every epoch and for every world size).
        rank, world_size: default to the initialised process group (or 0 and 1).
    """

    def __init__(
        self,
        labels: torch.Tensor | Sequence[int],
        n_way: int,
        k_shot: int,
        n_query: int,
        episodes: int,
        seed: int = 0,
        fixed: bool = False,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        labels = torch.as_tensor(labels, dtype=torch.int64)
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        self.episodes, self.seed, self.fixed = episodes, seed, fixed
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        self.epoch = 0
        classes, counts = labels.unique(return_counts=True)
        per_class = k_shot + n_query
        if (counts < per_class).any():
            rank_zero_warn(f"{int((counts < per_class).sum())} classes have fewer than k_shot + n_query = {per_class} "
                           "images and are never drawn")
        self.classes = classes[counts >= per_class]
        if len(self.classes) < n_way:
            raise ValueError(f"{n_way}-way episodes need {n_way} classes with ≥ {per_class} images each; the split "
                             f"has {len(self.classes)}")
        # members[c, i]: dataset index of the i-th image of class c; padded with -1 up to the largest class
        order = torch.argsort(labels, stable=True)
        sorted_labels = labels[order]
        keep = torch.isin(sorted_labels, self.classes)
        order, sorted_labels = order[keep], sorted_labels[keep]
        class_pos = torch.searchsorted(self.classes, sorted_labels)
        counts = torch.bincount(class_pos, minlength=len(self.classes))
        starts = torch.cumsum(counts, 0) - counts
        within = torch.arange(len(order)) - starts[class_pos]
        self.members = torch.full((len(self.classes), int(counts.max())), -1, dtype=torch.int64)
        self.members[class_pos, within] = order
        self.counts = counts

    def __len__(self) -> int:
        if self.fixed:
            return len(range(self.rank, self.episodes, self.world_size))
        return self.episodes // self.world_size

    def _draw(self, generator: torch.Generator) -> list[int]:
        chosen = torch.randperm(len(self.classes), generator=generator)[: self.n_way]
        # a random key per member, +inf on padding: the K+Q smallest keys are a uniform draw without replacement
        keys = torch.rand(self.n_way, self.members.shape[1], generator=generator)
        keys[self.members[chosen] < 0] = math.inf
        picks = keys.argsort(dim=1)[:, : self.k_shot + self.n_query]
        return self.members[chosen].gather(1, picks).flatten().tolist()

    def epoch_batches(self) -> Iterator[list[int]]:
        if self.fixed:
            for episode in range(self.rank, self.episodes, self.world_size):
                yield self._draw(seeded_generator(self.seed, episode))
        else:
            generator = seeded_generator(self.seed, self.epoch, self.rank)
            for _ in range(len(self)):
                yield self._draw(generator)


class EpisodeCollate:
    """Stacks an episode's ``N·(K+Q)`` ``(image, label)`` items into an ``Episode``."""

    def __init__(self, n_way: int, k_shot: int, n_query: int) -> None:
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query

    def __call__(self, items: list[tuple[torch.Tensor, int]]) -> Episode:
        images = torch.stack([image for image, _ in items])
        images = images.view(self.n_way, self.k_shot + self.n_query, *images.shape[1:])
        labels = torch.as_tensor([label for _, label in items]).view(self.n_way, -1)
        if not (labels == labels[:, :1]).all():
            raise RuntimeError("episode rows mix classes: the sampler and collate disagree on the episode shape")
        return Episode(images[:, : self.k_shot], images[:, self.k_shot :], labels[:, 0])
