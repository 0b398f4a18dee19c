"""What every zoo DataModule shares: loaders that shard themselves across DDP ranks and resume mid-epoch, clear
errors for missing data, and image reading.

``ZooDataModule`` builds every loader a family needs from three pieces:

* ``batch_sampler_loader(dataset, batch_sampler)``: training batches from one of the zoo's ``EpochBatchSampler``\ s
  (``datamodules.sampler``), in a ``ResumableDataLoader`` that Lightning saves in checkpoints;
* ``two_stream_loader({name: (dataset, batch_size)}, num_batches, seed)``: several training streams in lock-step
  (labeled/unlabeled, source/target, A/B), each ``num_batches`` long, batches ``{name: batch}``;
* ``eval_loader(dataset)``: rank ``r`` of ``w`` evaluates items ``r, r + w, ...``, every item exactly once.

The samplers shard across ranks themselves, so Lightning must not wrap them in a ``DistributedSampler``: the zoo's CLI
sets ``trainer.use_distributed_sampler: false`` and every loader refuses DDP without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from datamodules.sampler import EpochBatchSampler, RandomBatchSampler, ShardedRandomBatchSampler, dist_rank_world

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "ZooDataModule", "ResumableDataLoader", "DatasetNotFoundError",
    "CorruptImageError", "read_image", "require_path", "IMAGE_EXTENSIONS", "list_images", "ImageFileDataset",
]

#: the normalisation of ImageNet-pretrained backbones (timm's and torchvision's defaults)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where the config says; the message gives the expected layout and how to get it."""


class CorruptImageError(RuntimeError):
    """An image file could not be decoded, or its samples have no known 8-bit scale; the message names the file."""


def require_path(path: str | Path, dataset: str, layout: str, how_to_get: str) -> Path:
    """Return ``path`` if it exists, else raise ``DatasetNotFoundError`` naming the path, the layout and the source."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(
            f"{dataset} not found at '{path.resolve()}'.\nExpected layout:\n{layout.rstrip()}\nHow to get it: {how_to_get}"
        )
    return path


#: modes whose samples are wider than 8 bits; PIL's ``convert`` to "L"/"RGB" clips them to 0..255 instead of scaling
_WIDE_MODES = ("I", "F")


def _is_wide(mode: str) -> bool:
    return mode in _WIDE_MODES or mode.startswith("I;16")


def _scale_to_8bit(img: Image.Image, path: str | Path) -> Image.Image:
    """A 16-bit, 32-bit integer or float image as mode "L", scaled by the full scale of its bit depth.

    PIL's ``convert("L")`` of such an image clips every sample to 0..255, so a 16-bit ramp becomes black and white;
    here the samples are divided by the full scale instead, with rounding:

    * ``I;16`` / ``I;16B`` / ``I;16L`` / ``I;16N`` (16-bit PNG and TIFF): 0..65535 → 0..255 (divide by 257);
    * ``I`` (32-bit signed integers; older Pillow opens 16-bit PNGs so): read as 16-bit, 65535 full scale; values
      below 0 or above 65535 have no known full scale and are refused;
    * ``F`` (32-bit float TIFF): values in [0, 1] → 0..255; any other range (or NaN) has no known full scale and is
      refused, since guessing one (e.g. min-max stretching) would change the image per file.

    Raises:
        CorruptImageError: naming the file, the mode and the value range, for the refused images.
    """
    samples = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        finite = bool(np.isfinite(samples).all())
        if not finite or samples.size and (samples.min() < 0 or samples.max() > 1):
            shown = "non-finite values" if not finite else f"values {samples.min():g}..{samples.max():g}"
            raise CorruptImageError(f"'{path}': float image (mode F) with {shown}; only values in [0, 1] can be "
                                    "scaled to 8 bits")
        full_scale = 1.0
    else:  # I;16* (unsigned 16-bit by construction) or I (32-bit signed)
        if samples.size and (samples.min() < 0 or samples.max() > 65535):
            raise CorruptImageError(f"'{path}': integer image (mode {img.mode}) with values "
                                    f"{samples.min():.0f}..{samples.max():.0f}; only 0..65535 (16-bit data) can be "
                                    "scaled to 8 bits")
        full_scale = 65535.0
    return Image.fromarray(np.rint(samples * (255.0 / full_scale)).astype(np.uint8))  # 2-D uint8: mode "L"


def read_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Open an image fully (``load`` forces the decode) in ``mode``, or raise ``CorruptImageError`` naming the file.

    Images of more than 8 bits per sample (16-bit PNG/TIFF, 32-bit integer or float) are scaled to 8 bits by the
    full scale of their bit depth before the conversion to an 8-bit ``mode`` ("L", "RGB", ...), as
    ``_scale_to_8bit`` describes: PIL's own conversion clips them to 0..255 and a 16-bit image turns into two values.
    A wide ``mode`` ("I", "F", "I;16") is served as PIL converts it.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if _is_wide(img.mode) and not _is_wide(mode):
                return _scale_to_8bit(img, path).convert(mode)
            return img.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(f"cannot decode image '{path}': {err}") from err


#: the file endings ``list_images`` takes for images (lower case)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def list_images(folder: str | Path, what: str = "predict_dir") -> list[Path]:
    """The image files under ``folder`` (recursively, sorted by path), or a ``DatasetNotFoundError`` naming the folder
    when it is missing or holds no image."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{what}: '{folder.resolve()}' is not a folder. Expected a folder of images "
                                   f"(any depth; endings {', '.join(IMAGE_EXTENSIONS)}).")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DatasetNotFoundError(f"{what}: '{folder.resolve()}' holds no image (endings "
                                   f"{', '.join(IMAGE_EXTENSIONS)}).")
    return files


class ImageFileDataset(Dataset):
    """A list of image files for ``zoo predict``: item ``i`` is ``{"image": transform(image), "path": str,
    "index": i, "size": tensor([height, width])}`` with the size of the file's image before the transform (detectors
    scale their boxes back to it).

    Args:
        files: the image files (``list_images`` of a folder).
        transform: maps the PIL image to the model's input tensor (the datamodule's ``predict_transform``).
        mode: the PIL mode to read the images in (``"RGB"``, ``"L"``).
    """

    def __init__(self, files: list[Path], transform: Callable[[Image.Image], Any], mode: str = "RGB") -> None:
        self.files, self.transform, self.mode = [Path(f) for f in files], transform, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = read_image(self.files[index], self.mode)
        return {"image": self.transform(image), "path": str(self.files[index]), "index": index,
                "size": torch.tensor([image.height, image.width])}


class _CountingIterator:
    """Passes a DataLoader iterator through and tells its ``ResumableDataLoader`` how far the epoch has gone."""

    def __init__(self, loader: "ResumableDataLoader", iterator: Iterator) -> None:
        self.loader, self.iterator = loader, iterator

    def __iter__(self) -> "_CountingIterator":
        return self

    def __next__(self) -> Any:
        batch = next(self.iterator)
        sampler = self.loader.batch_sampler
        if self.loader._position is None or self.loader._position[2] is not self:
            # The first batch of this iteration: the sampler has started it and knows its epoch and skipped batches.
            epoch, skipped = sampler.iteration
            self.loader._position = [epoch, skipped, self]
        self.loader._position[1] += 1
        return batch


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an ``EpochBatchSampler`` whose position in the epoch goes into checkpoints.

    Lightning treats a training loader with ``state_dict``/``load_state_dict`` as stateful: it stores the state in
    every checkpoint and loads it into the new loader before the resumed run iterates it. The state is the epoch, the
    batches served of it and what the sampler needs to rebuild the epoch; on load the sampler resumes that epoch after
    those batches (or starts the next epoch, when the saved one was complete). Batches are counted as they leave the
    loader, so workers fetching ahead do not shift the count.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, EpochBatchSampler):
            raise TypeError(f"ResumableDataLoader needs an EpochBatchSampler, got {type(self.batch_sampler).__name__}")
        self._position: Optional[list] = None  # [epoch, batches served, the iterator that serves them]
        #: after ``load_state_dict``: True when the run resumes inside an epoch, False at an epoch's start
        self.resumes_mid_epoch: Optional[bool] = None

    def __iter__(self) -> Iterator:
        return _CountingIterator(self, super().__iter__())

    def state_dict(self) -> dict[str, Any]:
        sampler = self.batch_sampler
        epoch, served = (self._position[0], self._position[1]) if self._position is not None else (sampler.epoch, 0)
        return {"epoch": epoch, "batches_served": served, "batches": len(sampler), "sampler": sampler.epoch_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        epoch, served = int(state["epoch"]), int(state["batches_served"])
        self.resumes_mid_epoch = served < int(state["batches"])
        if self.resumes_mid_epoch:
            self.batch_sampler.resume(epoch, served, state.get("sampler"))
        else:
            self.batch_sampler.resume(epoch + 1, 0)  # the saved epoch was complete: the next one starts afresh


class ZooDataModule(L.LightningDataModule):
    """Builds the loaders of ``self.train_set`` / ``val_set`` / ``test_set`` (filled by ``setup``), sharded and
    resumable.

    The plain loaders: training batches of ``batch_size`` shuffled every epoch (``RandomBatchSampler``: with one
    process the batches ``DataLoader(shuffle=True)`` would give; under DDP those of Lightning's
    ``DistributedSampler``), evaluation by ``eval_loader``. Families with other batches override
    ``train_dataloader`` with ``batch_sampler_loader`` or ``two_stream_loader`` (see the module docstring).

    Args:
        batch_size: training batch size per process (under DDP the global batch is ``batch_size × world size``).
        eval_batch_size: batch size for validation, test and predict (default: ``batch_size``).
        num_workers: dataloader worker processes.
        pin_memory: pin host memory (useful on GPU).
        predict_dir: a folder of one's own images for ``zoo predict`` (read by ``predict_sets``); ``None``: predict
            on the test split.
    """

    def __init__(
        self,
        *,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        predict_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.predict_dir = predict_dir
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

    # ---- the pieces every loader is built from ----------------------------------------------------------------------

    def _world(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this process, for sharding: from the trainer (which must not shard as well), else
        from ``torch.distributed``, else ``(0, 1)``."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            self._check_sampler_setting()
            return trainer.global_rank, trainer.world_size
        return dist_rank_world(None, None)

    def _check_sampler_setting(self) -> None:
        """The zoo's loaders shard across ranks themselves; Lightning wrapping them in a ``DistributedSampler`` as well
        would be wrong (or fail), so refuse DDP unless ``trainer.use_distributed_sampler`` is false (the CLI's
        default)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise RuntimeError(f"{type(self).__name__} shards its loaders across ranks itself: set "
                               "`trainer.use_distributed_sampler: false` (the zoo CLI's default)")

    def _require(self, dataset: Optional[Dataset], split: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: the {split} split is not set up (call setup() with the right "
                               "stage first)")
        return dataset

    def batch_sampler_loader(self, dataset: Dataset, batch_sampler: EpochBatchSampler,
                             collate_fn: Optional[Callable] = None) -> ResumableDataLoader:
        """Training batches of ``dataset`` drawn by ``batch_sampler``, resumable mid-epoch (``ResumableDataLoader``).

        The sampler starts at the trainer's current epoch: with worker processes the first epoch's indices are drawn
        as soon as Lightning creates the iterator, before its first ``set_epoch``, so a resumed run must not start
        from epoch 0.
        """
        self._check_sampler_setting()
        trainer = getattr(self, "trainer", None)
        batch_sampler.set_epoch(trainer.current_epoch if trainer is not None else 0)
        return ResumableDataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn,
                                   num_workers=self.num_workers, pin_memory=self.pin_memory,
                                   persistent_workers=self.num_workers > 0)

    def two_stream_loader(self, streams: Mapping[str, tuple[Dataset, int]], num_batches: int,
                          seed: int, collate_fns: Optional[Mapping[str, Callable]] = None) -> CombinedLoader:
        """Batches ``{name: batch of that stream}`` from several datasets in lock-step, ``num_batches`` per epoch.

        Stream ``i`` (in ``streams`` order) draws ``ShardedRandomBatchSampler(len(dataset), batch_size, num_batches,
        seed=len(streams) · seed + i)``: the streams are shuffled independently, each rank takes disjoint items at
        every step, and a smaller dataset simply starts another pass, so no stream is cycled by Lightning.
        ``collate_fns`` names a stream's collate function (default: torch's).
        """
        rank, world = self._world()
        collate_fns = dict(collate_fns or {})
        loaders = {
            name: self.batch_sampler_loader(dataset, ShardedRandomBatchSampler(
                len(dataset), batch_size, num_batches, len(streams) * seed + i, rank, world), collate_fns.get(name))
            for i, (name, (dataset, batch_size)) in enumerate(streams.items())
        }
        return CombinedLoader(loaders, mode="max_size_cycle")

    def eval_loader(self, dataset: Dataset, collate_fn: Optional[Callable] = None) -> DataLoader:
        """Rank ``r`` of ``w`` evaluates items ``r, r + w, ...``: every item once, no padding (Lightning's
        ``DistributedSampler`` pads with repeats). Metrics that are torchmetrics objects are then exact over ranks;
        models that gather outputs restore the order by the index each item carries."""
        self._check_sampler_setting()
        rank, world = self._world()
        shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
        return DataLoader(shard, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0, collate_fn=collate_fn)

    # ---- the loaders Lightning asks for ---------------------------------------------------------------------------

    #: the collate function of the evaluation loaders (``None``: torch's default)
    eval_collate_fn: Optional[Callable] = None

    def evaluation_sets(self, split: str) -> Dataset | list[Dataset]:
        """The dataset(s) evaluated in ``split`` (``"val"``, ``"test"`` or ``"predict"``), one loader each: a list
        gives several loaders in that order (query then gallery, ``testA`` then ``testB``)."""
        return self.val_set if split == "val" else self.test_set

    def _evaluation_loaders(self, split: str) -> DataLoader | list[DataLoader]:
        sets = self.evaluation_sets(split)
        loaders = [self.eval_loader(self._require(dataset, split), collate_fn=self.eval_collate_fn)
                   for dataset in (sets if isinstance(sets, (list, tuple)) else [sets])]
        return loaders if isinstance(sets, (list, tuple)) else loaders[0]

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_set, "training")
        rank, world = self._world()
        return self.batch_sampler_loader(dataset, RandomBatchSampler(len(dataset), self.batch_size, rank=rank,
                                                                     world_size=world))

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._evaluation_loaders("val")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._evaluation_loaders("test")

    #: the PIL mode ``predict_dir`` images are read in (``"L"`` for the grey-scale embedded defaults)
    predict_image_mode: str = "RGB"

    def predict_transform(self) -> Callable[[Image.Image], Any]:
        """The transform of a ``predict_dir`` image: the test split's (resize, tensor, normalisation) for this data."""
        raise NotImplementedError(f"{type(self).__name__} does not read a predict_dir folder; predict on its test "
                                  "split (leave data.predict_dir unset)")

    def predict_sets(self) -> Dataset | list[Dataset]:
        """What ``zoo predict`` runs on: the images of ``predict_dir`` when it is set, else the test split(s)."""
        if self.predict_dir is None:
            return self.evaluation_sets("predict")
        return ImageFileDataset(list_images(self.predict_dir), self.predict_transform(), self.predict_image_mode)

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.predict_dir is None:
            return self._evaluation_loaders("predict")
        sets = self.predict_sets()
        loaders = [self.eval_loader(dataset) for dataset in (sets if isinstance(sets, (list, tuple)) else [sets])]
        return loaders if isinstance(sets, (list, tuple)) else loaders[0]
