"""Image-classification data on disk: a train/val/test folder tree, and CIFAR-10/100 through torchvision.

The embedded default, scikit-learn's digits, is ``datamodules.digits.DigitsDataModule``. ``zoo predict`` reads a folder
of one's own images (``predict_dir``) through each datamodule's evaluation transform.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Subset
from torchvision import datasets
from torchvision.transforms import v2

from datamodules.base import IMAGENET_MEAN, IMAGENET_STD, ZooDataModule, read_image, require_path
from datamodules.cifar import download_cifar, open_cifar

__all__ = ["ImageFolderDataModule", "CIFAR10DataModule", "CIFAR100DataModule"]

_FOLDER_LAYOUT = """\
  <root>/train/<class_name>/<image>.jpg|.png|...
  <root>/val/<class_name>/...      (same class folders as train)
  <root>/test/<class_name>/...     (optional; test falls back to val)"""


def _to_float_image(mean: Sequence[float], std: Sequence[float]) -> list[Callable]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


class ImageFolderDataModule(ZooDataModule):
    """Any dataset laid out as ``train/``, ``val/`` (and optionally ``test/``) folders of class sub-folders.

    Training uses ``RandomResizedCrop`` + horizontal flip; evaluation (and ``predict_dir`` images) resizes to
    ``image_size / crop_pct`` and centre-crops (the ImageNet protocol). Images are read with PIL; an undecodable file
    fails with its path. The class names are the ``train/`` sub-folder names, so predicting on ``predict_dir`` still
    reads the ``train/`` tree for them.

    Args:
        root: dataset root holding the split folders.
        image_size: training crop and evaluation size.
        crop_pct: evaluation centre-crop fraction.
        mean, std: normalisation (ImageNet's by default, matching timm's pretrained weights).
        train_dir, val_dir, test_dir: split folder names under ``root``.
        batch_size, eval_batch_size, num_workers, pin_memory, predict_dir: see ``ZooDataModule``.
    """

    def __init__(
        self,
        *,
        root: str,
        image_size: int = 224,
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str = "test",
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        predict_dir: Optional[str] = None,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, predict_dir=predict_dir)
        self.root = Path(root)
        self.image_size, self.crop_pct = image_size, crop_pct
        self.mean, self.std = tuple(mean), tuple(std)
        self.split_dirs = {"train": train_dir, "val": val_dir, "test": test_dir}
        self.num_classes: Optional[int] = None
        self.class_names: list[str] = []

    def train_transform(self) -> Callable:
        return v2.Compose([v2.RandomResizedCrop(self.image_size, antialias=True), v2.RandomHorizontalFlip(),
                           *_to_float_image(self.mean, self.std)])

    def eval_transform(self) -> Callable:
        resize = int(round(self.image_size / self.crop_pct))
        return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(self.image_size),
                           *_to_float_image(self.mean, self.std)])

    def predict_transform(self) -> Callable:
        return self.eval_transform()

    def _folder(self, split: str, transform: Callable) -> datasets.ImageFolder:
        path = require_path(self.root / self.split_dirs[split], f"ImageFolder split '{split}'", _FOLDER_LAYOUT,
                            "arrange your images in class sub-folders, or point `data.init_args.root` at such a tree")
        try:
            return datasets.ImageFolder(str(path), transform=transform, loader=partial(read_image, mode="RGB"))
        except FileNotFoundError as err:  # raised by torchvision for empty class folders
            raise FileNotFoundError(f"{err}\nExpected layout:\n{_FOLDER_LAYOUT}") from err

    def setup(self, stage: Optional[str] = None) -> None:
        train = self._folder("train", self.train_transform())
        self.class_names = list(train.classes)
        self.num_classes = len(self.class_names)
        self.train_set = train
        self.val_set = self._folder("val", self.eval_transform())
        if self.val_set.classes != train.classes:
            raise ValueError(
                f"'{self.root / self.split_dirs['val']}' has classes {self.val_set.classes[:5]}... but train has "
                f"{train.classes[:5]}...: every split needs the same class folders"
            )
        test_dir = self.root / self.split_dirs["test"]
        self.test_set = self._folder("test", self.eval_transform()) if test_dir.exists() else self.val_set


class CIFAR10DataModule(ZooDataModule):
    """CIFAR-10 through ``torchvision.datasets.CIFAR10`` (the python pickle batches).

    ``download`` is ``False`` by default: nothing is fetched unless asked. Validation is a seeded, class-stratified
    hold-out of ``val_size`` training images; the official test set is the test split. ``predict_dir`` images are
    resized (shorter side) and centre-cropped to 32 px, then normalised as the test split; the class names come from
    the release's meta file.

    Args:
        root: folder holding ``cifar-10-batches-py/``.
        download: fetch the dataset into ``root`` if missing (needs internet).
        val_size: training images held out for validation (0 = validate on the test set, as many papers do).
        split_seed: seed of the hold-out.
        augment: random crop with 4-pixel padding and horizontal flip.
        batch_size, eval_batch_size, num_workers, pin_memory, predict_dir: see ``ZooDataModule``.
    """

    dataset_name = "CIFAR10"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(
        self,
        *,
        root: str = "data/cifar10",
        download: bool = False,
        val_size: int = 5000,
        split_seed: int = 0,
        augment: bool = True,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        predict_dir: Optional[str] = None,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, predict_dir=predict_dir)
        self.root, self.download = Path(root), download
        self.class_names: list[str] = []
        self.val_size, self.split_seed, self.augment = val_size, split_seed, augment

    def prepare_data(self) -> None:
        if self.download:
            download_cifar(self.root, self.dataset_name)

    def _dataset(self, train: bool, transform: Callable):
        return open_cifar(self.root, self.dataset_name, train, transform)

    def predict_transform(self) -> Callable:
        return v2.Compose([v2.Resize(32, antialias=True), v2.CenterCrop(32), *_to_float_image(self.mean, self.std)])

    def setup(self, stage: Optional[str] = None) -> None:
        augment = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if self.augment else []
        train_tf = v2.Compose([*augment, *_to_float_image(self.mean, self.std)])
        eval_tf = v2.Compose(_to_float_image(self.mean, self.std))
        train_full = self._dataset(True, train_tf)
        self.test_set = self._dataset(False, eval_tf)
        self.class_names = list(self.test_set.classes)
        if self.val_size > 0:
            targets = np.asarray(train_full.targets)
            rng = np.random.default_rng(self.split_seed)
            per_class = self.val_size // self.num_classes
            val_idx = np.concatenate([rng.permutation(np.flatnonzero(targets == c))[:per_class] for c in range(self.num_classes)])
            train_idx = np.setdiff1d(np.arange(len(targets)), val_idx)
            self.train_set = Subset(train_full, train_idx.tolist())
            self.val_set = Subset(self._dataset(True, eval_tf), np.sort(val_idx).tolist())
        else:
            self.train_set, self.val_set = train_full, self.test_set


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels) through ``torchvision.datasets.CIFAR100``; same arguments as ``CIFAR10DataModule``."""

    dataset_name = "CIFAR100"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)

    def __init__(self, *, root: str = "data/cifar100", **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)
