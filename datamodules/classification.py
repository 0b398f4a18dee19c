"""Image-classification data on disk: a train/val/test folder tree, and CIFAR-10/100 through torchvision.

The embedded default, scikit-learn's digits, is ``datamodules.digits.DigitsDataModule``. ``zoo predict`` reads a folder
of one's own images (``predict_dir``) through each datamodule's evaluation transform.
"""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Subset
from torchvision import datasets
from torchvision.transforms import v2

from datamodules.base import (IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, DatasetNotFoundError, ZooDataModule,
                              read_image, require_path)
from datamodules.cifar import download_cifar, open_cifar

__all__ = ["ImageFolderDataModule", "CIFAR10DataModule", "CIFAR100DataModule", "RandomResizedCropWithBox",
           "load_label_map", "LabelMapImageFolder", "ReLabelImageFolderDataModule", "EitherLabelDataset",
           "ReLabelDigitCanvasDataModule"]

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


# ---- ReLabel: crops that remember their box, and the teacher's label maps ---------------------------------------------

_RELABEL_LAYOUT = """\
  <root>/train/<class_name>/<image>.JPEG|.png|...
  <label_maps>/<class_name>/<image stem>.pt    one per training image: float tensor (2, k, h, w), [0] the top-k
                                               scores, [1] their class indices (the released ImageNet maps:
                                               k = 5, 15 × 15; write your own with LabelMapWriter)
  <root>/val/<class_name>/...                  (validation uses the single labels)"""


class RandomResizedCropWithBox(torch.nn.Module):
    """``RandomResizedCrop`` that also returns where it cropped: ``image → (crop, box)`` with ``box`` the float tensor
    ``(x1, y1, x2, y2)`` as fractions of the original image's width and height (the official
    ``RandomResizedCropWithCoords`` records the same crop as ``(top, left, height, width)``).

    Args:
        size: output ``(height, width)`` or one side of a square.
        scale, ratio: as ``torchvision.transforms.RandomResizedCrop``.
    """

    def __init__(self, size: int | Sequence[int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3)) -> None:
        super().__init__()
        self.size = [size, size] if isinstance(size, int) else list(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def forward(self, image: Any) -> tuple[Any, torch.Tensor]:
        from torchvision.transforms import RandomResizedCrop  # noqa: PLC0415 — its get_params, the v1 sampling rule

        height, width = v2.functional.get_size(image)
        top, left, crop_h, crop_w = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        crop = v2.functional.resized_crop(image, top, left, crop_h, crop_w, self.size, antialias=True)
        box = torch.tensor([left / width, top / height, (left + crop_w) / width, (top + crop_h) / height])
        return crop, box


def load_label_map(path: str | Path, num_classes: Optional[int] = None) -> torch.Tensor:
    """One label map ``(2, k, h, w)`` (float32) from its ``.pt`` file, or an error that names the file: missing,
    unreadable, not a ``(2, k, h, w)`` tensor, non-finite scores, or class indices outside ``[0, num_classes)``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"label map '{path}' is missing. Expected layout:\n{_RELABEL_LAYOUT}")
    try:
        label_map = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — any unpickling failure is a bad file
        raise CorruptImageError(f"cannot read label map '{path}': {err}") from err
    if not isinstance(label_map, torch.Tensor) or label_map.ndim != 4 or label_map.shape[0] != 2:
        shape = tuple(label_map.shape) if isinstance(label_map, torch.Tensor) else type(label_map).__name__
        raise CorruptImageError(f"label map '{path}' is {shape}; expected a tensor (2, k, h, w): top-k scores, then "
                                "their class indices")
    label_map = label_map.float()
    classes = label_map[1]
    if not torch.isfinite(label_map).all():
        raise CorruptImageError(f"label map '{path}' has non-finite values")
    if (classes != classes.round()).any() or classes.min() < 0 or (num_classes is not None and classes.max() >= num_classes):
        raise CorruptImageError(f"label map '{path}' has class indices {classes.min():g}..{classes.max():g}; expected "
                                f"integers in [0, {num_classes})")
    return label_map


class LabelMapImageFolder(datasets.ImageFolder):
    """An ImageFolder whose items carry what LabelPooling needs: ``(crop, label, box (4,), label_map (2, k, h, w))``.

    The label map of ``<root>/<class>/<name>.<ext>`` is ``<label_maps>/<class>/<name>.pt``, read when the item is
    (the ImageNet maps are 1.28 M files); ``transform`` applies after the crop (flip, colour jitter, tensor
    conversion), so the box stays that of the original image.
    """

    def __init__(self, root: str | Path, label_maps: str | Path, crop: RandomResizedCropWithBox,
                 transform: Callable, num_classes: Optional[int] = None, image_mode: str = "RGB") -> None:
        super().__init__(str(root), loader=partial(read_image, mode=image_mode))
        self.label_maps, self.crop, self.post_crop = Path(label_maps), crop, transform
        self.num_classes = num_classes or len(self.classes)

    def label_map_path(self, index: int) -> Path:
        path = Path(self.samples[index][0])
        return self.label_maps / path.parent.name / f"{path.stem}.pt"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
        path, label = self.samples[index]
        crop, box = self.crop(self.loader(path))
        return self.post_crop(crop), label, box, load_label_map(self.label_map_path(index), self.num_classes)

    def crop_example(self, index: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """``(original image (C, H, W) in [0, 1], box, label, label_map)`` of item ``index`` with the crop drawn
        from ``seed`` (for the dashboard's fixed examples; the global random state is left as it was)."""
        path, label = self.samples[index]
        image = self.loader(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, box = self.crop(image)
        original = v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True)
        return original, box, label, load_label_map(self.label_map_path(index), self.num_classes)


class ReLabelImageFolderDataModule(ImageFolderDataModule):
    """ImageNet (or any class-folder tree) with ReLabel's label maps: training items are random resized crops with
    their boxes and label maps (``LabelMapImageFolder``); validation and test are ``ImageFolderDataModule``'s, on
    the single labels.

    Layout (ImageNet's train/ and val/ folders as they unpack, the label maps as the released archive unpacks)::

        <root>/train/<class_name>/<image>.JPEG|.png|...
        <label_maps>/<class_name>/<image stem>.pt    float (2, k, h, w): [0] top-k scores, [1] their class indices
        <root>/val/<class_name>/...                  (validation uses the single labels)

    Args:
        root, image_size, crop_pct, mean, std, train_dir, val_dir, test_dir: see ``ImageFolderDataModule``.
        label_maps: the label-map folder (``<class>/<stem>.pt``); needed to train, not to validate, test or predict.
        scale, ratio: of the random resized crop (the official recipe: (0.08, 1), (3/4, 4/3)).
        flip: probability of a horizontal flip after the crop (the pooled 1 × 1 label does not depend on it).
        color_jitter: brightness, contrast and saturation jitter after the crop (0.4 in the official recipe; 0: none).
        image_mode: PIL mode the images are read in ("RGB"; "L" for grey images).
        predict_size: with ``zoo predict``, resize each whole image to this ``[height, width]`` (or square) instead
            of the evaluation's resize + centre crop: what ``LabelMapWriter`` needs, since the crop boxes are
            fractions of the whole image.
        batch_size, eval_batch_size, num_workers, pin_memory, predict_dir: see ``ZooDataModule``.
    """

    def __init__(
        self,
        *,
        root: str,
        label_maps: Optional[str] = None,
        image_size: int = 224,
        crop_pct: float = 0.875,
        mean: Optional[Sequence[float]] = IMAGENET_MEAN,
        std: Optional[Sequence[float]] = IMAGENET_STD,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip: float = 0.5,
        color_jitter: float = 0.4,
        image_mode: str = "RGB",
        predict_size: Optional[int | Sequence[int]] = None,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str = "test",
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        predict_dir: Optional[str] = None,
    ) -> None:
        super().__init__(root=root, image_size=image_size, crop_pct=crop_pct, mean=mean or (), std=std or (),
                         train_dir=train_dir, val_dir=val_dir, test_dir=test_dir, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         predict_dir=predict_dir)
        if mean is None or std is None:
            self.mean = self.std = None
        self.label_maps = None if label_maps is None else Path(label_maps)
        self.scale, self.ratio, self.flip, self.color_jitter = tuple(scale), tuple(ratio), flip, color_jitter
        self.image_mode, self.predict_size = image_mode, predict_size
        self.predict_image_mode = image_mode

    def _to_tensor(self) -> list[Callable]:
        if self.mean is None:
            return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        return _to_float_image(self.mean, self.std)

    def train_transform(self) -> Callable:
        """After the crop: flip, colour jitter, tensor conversion and normalisation."""
        jitter = [v2.ColorJitter(self.color_jitter, self.color_jitter, self.color_jitter)] if self.color_jitter else []
        return v2.Compose([v2.RandomHorizontalFlip(self.flip), *jitter, *self._to_tensor()])

    def eval_transform(self) -> Callable:
        resize = int(round(self.image_size / self.crop_pct))
        return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(self.image_size), *self._to_tensor()])

    def predict_transform(self) -> Callable:
        if self.predict_size is None:
            return self.eval_transform()
        size = [self.predict_size] * 2 if isinstance(self.predict_size, int) else list(self.predict_size)
        return v2.Compose([v2.Resize(size, antialias=True), *self._to_tensor()])

    def _folder(self, split: str, transform: Callable) -> datasets.ImageFolder:
        folder = super()._folder(split, transform)
        folder.loader = partial(read_image, mode=self.image_mode)
        return folder

    def setup(self, stage: Optional[str] = None) -> None:
        super().setup(stage)
        if stage not in (None, "fit"):
            return  # validation, test and predict read the single labels (and predict_dir): no label maps needed
        if self.label_maps is None:
            raise ValueError(f"{type(self).__name__}: training needs `label_maps`, the folder of label maps. Expected "
                             f"layout:\n{_RELABEL_LAYOUT}")
        train_path = self.root / self.split_dirs["train"]
        require_path(self.label_maps, "ReLabel label maps", _RELABEL_LAYOUT,
                     "download the released maps (github.com/naver-ai/relabel_imagenet) or write them with "
                     "`zoo predict ... --trainer.callbacks+=zoo.classification.relabel.LabelMapWriter`")
        crop = RandomResizedCropWithBox(self.image_size, self.scale, self.ratio)
        self.train_set = LabelMapImageFolder(train_path, self.label_maps, crop, self.train_transform(),
                                             self.num_classes, self.image_mode)
        if len(self.train_set):
            load_label_map(self.train_set.label_map_path(0), self.num_classes)  # a wrong folder fails now, not later


class EitherLabelDataset(torch.utils.data.Dataset):
    """Images with two labels, ``(image, label_a, label_b)``, listed by a CSV ``file,label_a,label_b`` whose paths are
    relative to its folder (the whole test canvases of the ReLabel digits)."""

    def __init__(self, csv_path: str | Path, transform: Callable, image_mode: str = "L") -> None:
        self.root, self.transform, self.image_mode = Path(csv_path).parent, transform, image_mode
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        self.files = [self.root / row[0] for row in rows]
        self.labels = [(int(row[1]), int(row[2])) for row in rows]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = self.transform(read_image(self.files[index], self.image_mode))
        return image, *self.labels[index]


class ReLabelDigitCanvasDataModule(ReLabelImageFolderDataModule):
    """ReLabel's embedded default: two-digit canvases labelled by the left digit only, with a digit teacher's label
    maps (``datamodules.generated.relabel_digit_canvas``, written under ``root`` on first use, no download).

    Training crops are ``image_size`` squares of the ``digit_size × 2·digit_size`` canvases (scale ``scale`` of the
    canvas area, aspect 3/4..4/3, no flip: a mirrored digit is another glyph); validation and test are single digits
    of the val and test splits at ``image_size`` (the "each half alone" test), and the datamodule's
    ``either_label_test_set`` holds the whole test canvases for ``zoo.classification.relabel.EitherLabelAccuracy``.
    Images are grey, in [0, 1], not normalised.

    Args:
        root: where the set is written (and found again).
        seed: of the canvases and the teacher.
        split_seed: of the digits' train/val/test split (``datamodules.digits.split_indices``).
        digit_size: side of each digit; the canvases are ``digit_size × 2·digit_size``.
        top_k: classes kept per label-map cell.
        teacher_epochs: the teacher's training epochs.
        image_size: side of the training crops and of the evaluation images.
        scale: crop area range as a fraction of the canvas.
        batch_size, eval_batch_size, num_workers, predict_dir: see ``ZooDataModule``.
    """

    def __init__(self, *, root: str = "data/relabel_digits", seed: int = 0, split_seed: int = 0, digit_size: int = 16,
                 top_k: int = 3, teacher_epochs: int = 12, image_size: int = 16,
                 scale: Sequence[float] = (0.25, 1.0), batch_size: int = 64, eval_batch_size: Optional[int] = None,
                 num_workers: int = 0, predict_dir: Optional[str] = None) -> None:
        super().__init__(root=root, label_maps=str(Path(root) / "label_maps"), image_size=image_size, crop_pct=1.0,
                         mean=None, std=None, scale=scale, flip=0.0, color_jitter=0.0, image_mode="L",
                         predict_size=None, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, pin_memory=False, predict_dir=predict_dir)
        self.generation = dict(seed=seed, split_seed=split_seed, digit_size=digit_size, top_k=top_k,
                               teacher_epochs=teacher_epochs)
        self.either_label_test_set: Optional[EitherLabelDataset] = None

    def prepare_data(self) -> None:
        from datamodules.generated.relabel_digit_canvas import write_relabel_digit_canvas  # noqa: PLC0415

        write_relabel_digit_canvas(self.root, **self.generation)

    def predict_transform(self) -> Callable:
        return v2.Compose(self._to_tensor())  # a folder of canvases: each at its own size (the model is convolutional)

    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare_data()  # idempotent; setup() alone (a notebook, a test) must find the set too
        super().setup(stage)
        size = self.image_size
        self.either_label_test_set = EitherLabelDataset(
            self.root / "test_canvases.csv",
            v2.Compose([v2.Resize((size, 2 * size), antialias=True), *self._to_tensor()]), self.image_mode)
