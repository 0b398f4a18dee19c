"""What every zoo DataModule shares: loader settings, clear errors for missing data, and image reading."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from datamodules.sampler import dist_rank_world

__all__ = ["ZooDataModule", "DatasetNotFoundError", "CorruptImageError", "read_image", "require_path"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where the config says; the message gives the expected layout and how to get it."""


class CorruptImageError(RuntimeError):
    """An image file could not be decoded; the message names the file."""


def require_path(path: str | Path, dataset: str, layout: str, how_to_get: str) -> Path:
    """Return ``path`` if it exists, else raise ``DatasetNotFoundError`` naming the path, the layout and the source."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(
            f"{dataset} not found at '{path.resolve()}'.\nExpected layout:\n{layout.rstrip()}\nHow to get it: {how_to_get}"
        )
    return path


def read_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Open an image fully (``load`` forces the decode) or raise ``CorruptImageError`` naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(f"cannot decode image '{path}': {err}") from err


class ZooDataModule(L.LightningDataModule):
    """Builds the four dataloaders from ``self.train_set`` / ``val_set`` / ``test_set`` that ``setup`` fills.

    Args:
        batch_size: training batch size per process (under DDP the global batch is ``batch_size × world size``).
        eval_batch_size: batch size for validation, test and predict (default: ``batch_size``).
        num_workers: dataloader worker processes.
        pin_memory: pin host memory (useful on GPU).
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    #: normalisation applied by the transforms (``None``: images are already in [0, 1]); used by ``denormalize``
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation of a batch ``(B, C, H, W)`` for display; returns values in [0, 1]."""
        if self.mean is None or self.std is None:
            return images.clamp(0, 1)
        mean = images.new_tensor(self.mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.std).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1)

    def _world(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this process: from the trainer, else from ``torch.distributed``, else ``(0, 1)``."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return dist_rank_world(None, None)

    def _refuse_lightning_sampler(self) -> None:
        """DataModules that shard their loaders across ranks themselves cannot also have Lightning wrap them in a
        ``DistributedSampler``: refuse DDP unless the config sets ``trainer.use_distributed_sampler: false``."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise RuntimeError(f"{type(self).__name__} shards its loaders across ranks itself: set "
                               "`trainer.use_distributed_sampler: false`")

    def _strided_eval_loader(self, dataset: Dataset, collate_fn: Optional[Callable] = None) -> DataLoader:
        """Rank ``r`` of ``w`` evaluates items ``r, r + w, ...``: every item once, no padding (Lightning's
        ``DistributedSampler`` pads with repeats); the model all-gathers the outputs and restores the order by the
        index each item carries."""
        rank, world = self._world()
        shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
        return DataLoader(shard, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0, collate_fn=collate_fn)

    def _loader(self, dataset: Optional[Dataset], train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: this split was not set up (call setup() with the right stage)")
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
