"""scikit-learn's bundled handwritten digits: the zoo's embedded default, no download.

Shared by the families: ``DigitsDataModule`` is the reference classifier's data, and ``load_digit_images`` also serves
the semi-supervised digits (``datamodules.semisup``).

``sklearn.datasets.load_digits`` ships 1,797 8×8 grey images (16 levels) of the digits 0–9 with the library. The
zoo resizes them (bilinear) to ``image_size`` once, keeps them in memory as tensors in [0, 1] and splits them with a
seeded stratified split, so every run and every baseline sees the same train/val/test images.

``zoo predict`` on a folder of one's own images (``predict_dir``) reads them as these are: grey (``channels: 1``),
resized to ``image_size`` (bilinear), in [0, 1], light ink on a dark background as in scikit-learn's digits.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision.transforms import v2

from datamodules.base import ZooDataModule

__all__ = ["load_digit_images", "split_indices", "TensorImageDataset", "DigitsDataModule", "digit_image_transform"]


def load_digit_images(image_size: int = 8, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(N, channels, image_size, image_size)`` floats in [0, 1] and ``(N,)`` int64 labels."""
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    if channels == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    elif channels != 1:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return images, torch.from_numpy(digits.target.astype(np.int64))


def split_indices(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded, stratified train/val/test index split (every class keeps its share in every split)."""
    index = np.arange(len(labels))
    trainval, test = train_test_split(index, test_size=test_fraction, stratify=labels, random_state=seed)
    val_share = val_fraction / (1.0 - test_fraction)
    train, val = train_test_split(trainval, test_size=val_share, stratify=labels[trainval], random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


def digit_image_transform(image_size: int) -> Callable[[Any], torch.Tensor]:
    """A PIL image (or uint8 tensor) of a digit as the digits splits hold theirs: ``image_size`` square (bilinear,
    antialiased when shrinking; upsampling an 8×8 file gives the split's own bilinear resize), floats in [0, 1]."""
    return v2.Compose([v2.ToImage(), v2.Resize((image_size, image_size), antialias=True),
                       v2.ToDtype(torch.float32, scale=True)])


class TensorImageDataset(Dataset):
    """In-memory images ``(N, C, H, W)`` with labels, transformed per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Callable] = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[i]


class DigitsDataModule(ZooDataModule):
    """Digits 0–9 from scikit-learn, resized, split and augmented.

    Args:
        image_size: side length after bilinear resizing of the 8×8 originals.
        channels: 1 (grey) or 3 (grey repeated, for ImageNet-style backbones).
        classes: keep only these digits, relabelled ``0..len(classes)-1`` in the given order (e.g. ``[0, 1, 2, 3, 4]``
            to pre-train on half the classes and fine-tune on all ten).
        val_fraction: share of all images held out for validation.
        test_fraction: share of all images held out for testing.
        split_seed: seed of the stratified split (independent of the training seed).
        augment: random affine jitter (±10°, ±10 % shift, 0.9–1.1 scale) on training images; digits are never
            flipped, which would turn them into other symbols.
        batch_size, eval_batch_size, num_workers, pin_memory, predict_dir: see ``ZooDataModule``; ``predict_dir``
            images are read grey (``channels: 1``) or RGB and resized to ``image_size`` like the test split.
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        channels: int = 1,
        classes: Optional[Sequence[int]] = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        augment: bool = True,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        predict_dir: Optional[str] = None,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, predict_dir=predict_dir)
        self.image_size, self.channels = image_size, channels
        self.predict_image_mode = "L" if channels == 1 else "RGB"
        self.classes = list(range(10)) if classes is None else list(classes)
        if not self.classes or len(set(self.classes)) != len(self.classes) or not set(self.classes) <= set(range(10)):
            raise ValueError(f"classes must be distinct digits 0-9, got {classes}")
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.augment = augment
        self.num_classes = len(self.classes)
        self.class_names = [str(c) for c in self.classes]
        self._splits: Optional[dict[str, np.ndarray]] = None

    def _prepare_splits(self) -> None:
        if self._splits is not None:
            return
        images, labels = load_digit_images(self.image_size, self.channels)
        raw = load_digits()
        keep = np.isin(raw.target, self.classes)
        remap = {digit: i for i, digit in enumerate(self.classes)}
        self._images = images[torch.from_numpy(keep)]
        self._labels = torch.tensor([remap[int(d)] for d in raw.target[keep]], dtype=torch.int64)
        self._pixels = raw.data[keep].astype(np.float32)  # (N, 64) raw 8×8 pixels, for the pixel baselines
        train, val, test = split_indices(self._labels.numpy(), self.val_fraction, self.test_fraction, self.split_seed)
        self._splits = {"train": train, "val": val, "test": test}

    def train_transform(self) -> Optional[Callable]:
        if not self.augment:
            return None
        return v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))

    def predict_transform(self) -> Callable[[Any], torch.Tensor]:
        return digit_image_transform(self.image_size)

    def setup(self, stage: Optional[str] = None) -> None:
        self._prepare_splits()
        s = self._splits
        self.train_set = TensorImageDataset(self._images[s["train"]], self._labels[s["train"]], self.train_transform())
        self.val_set = TensorImageDataset(self._images[s["val"]], self._labels[s["val"]])
        self.test_set = TensorImageDataset(self._images[s["test"]], self._labels[s["test"]])

    def pixel_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Raw 64-pixel vectors and labels of ``split`` (``train``/``val``/``test``) for classical baselines."""
        self._prepare_splits()
        index = self._splits[split]
        return self._pixels[index], self._labels.numpy()[index]
