"""Fine-grained classification data read from the release formats: CUB-200-2011, NABirds, FGVC-Aircraft, Stanford Cars.

Every datamodule yields ``(image, label)`` batches with 0-based labels and follows the recipe of API-Net's official code
(Zhuang et al. 2020) and most fine-grained papers since: training images are resized to ``resize × resize`` (aspect
ratio not kept), randomly cropped to ``image_size`` and flipped; evaluation resizes the same way and centre-crops.

Two kinds of training batches:

- ``classes_per_batch=None``: shuffled batches of ``batch_size`` (a plain classifier baseline);
- ``classes_per_batch=P``: ``P`` classes × ``images_per_class`` images per batch from
  ``datamodules.sampler.BalancedClassSampler``, which API-Net's pair mining needs (30 × 4 on CUB). The sampler gives
  every DDP rank its own classes and the same number of batches.

``zoo predict`` runs on the test split, or with ``predict_dir`` on a folder of one's own images, resized and
centre-cropped as the test images are (without the box or banner crops, which need annotations); the class names come
from the dataset's annotation files, so they must be there.

Validation: with ``val_fraction=0`` the validation loader runs on the test split, as the papers report (the benchmarks
have no official validation set, except Aircraft with ``train_split="train"``); select the last epoch, not the best
one, or the test number is optimistic. ``val_fraction > 0`` holds out a seeded fraction of every class of the training
split instead.

On-disk formats (each datamodule's error message repeats its layout):

- ``CUBDataModule``: ``CUB_200_2011/`` as unpacked from ``CUB_200_2011.tgz``: ``images.txt``,
  ``image_class_labels.txt``, ``train_test_split.txt``, ``classes.txt``, ``bounding_boxes.txt``, ``images/``.
- ``NABirdsDataModule``: ``nabirds/``, the same files as CUB (plus ``hierarchy.txt``) with UUID image ids and sparse
  class ids (only the 555 leaf classes that have images are used, relabelled ``0..554`` in class-id order).
- ``FGVCAircraftDataModule``: ``fgvc-aircraft-2013b/data/``: ``images_<level>_<split>.txt``, ``variants.txt`` /
  ``families.txt`` / ``manufacturers.txt``, ``images_box.txt``, ``images/``; the 20-pixel copyright banner at the
  bottom of every image is cut off (the release README asks for it).
- ``StanfordCarsDataModule``: torchvision's ``StanfordCars`` layout: ``devkit/cars_meta.mat``,
  ``devkit/cars_train_annos.mat``, ``cars_test_annos_withlabels.mat``, ``cars_train/``, ``cars_test/``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from datamodules.base import IMAGENET_MEAN, IMAGENET_STD, DatasetNotFoundError, ZooDataModule, read_image, require_path
from datamodules.generated.finegrained_toybirds import write_toy_birds
from datamodules.sampler import BalancedClassSampler

__all__ = [
    "FineGrainedDataset",
    "FineGrainedDataModule",
    "CUBDataModule",
    "NABirdsDataModule",
    "FGVCAircraftDataModule",
    "StanfordCarsDataModule",
    "ToyBirdsDataModule",
]

#: ``(files, labels, boxes)`` of one split; ``boxes`` holds one ``(x, y, w, h)`` per file (0-based pixels) or is None
Records = tuple[list[Path], list[int], Optional[list[tuple[float, float, float, float]]]]


class FineGrainedDataset(Dataset):
    """Image files with a 0-based class label each, optionally cropped before the transform.

    Cropping happens on the decoded image, before any resize: first the bottom ``crop_bottom`` rows (Aircraft's
    banner), then, with ``crop_to_box``, the object's bounding box (clipped to what is left of the image).

    Args:
        files: image paths.
        labels: class of every file, ``0..num_classes-1``.
        transform: applied to the (cropped) RGB PIL image; ``None`` returns the PIL image.
        boxes: ``(x, y, w, h)`` per file in 0-based pixel coordinates; needed only with ``crop_to_box``.
        crop_to_box: crop every image to its box.
        crop_bottom: rows removed at the bottom of every image.
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        labels: Sequence[int] | torch.Tensor,
        transform: Optional[Callable] = None,
        boxes: Optional[Sequence[Sequence[float]]] = None,
        crop_to_box: bool = False,
        crop_bottom: int = 0,
    ) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        if crop_to_box and boxes is None:
            raise ValueError("crop_to_box=True needs a bounding box per file")
        if boxes is not None and len(boxes) != len(files):
            raise ValueError(f"{len(files)} files but {len(boxes)} bounding boxes")
        if crop_bottom < 0:
            raise ValueError(f"crop_bottom must be ≥ 0, got {crop_bottom}")
        # Numpy arrays instead of lists of Python objects: dataloader workers touching list items bump their
        # refcounts, which copies the parent's pages into every worker (pytorch/pytorch#13246).
        self._files = np.array([str(f) for f in files], dtype=str)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.boxes = None if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self.transform, self.crop_to_box, self.crop_bottom = transform, crop_to_box, crop_bottom

    @property
    def files(self) -> list[Path]:
        return [Path(f) for f in self._files]

    def __len__(self) -> int:
        return len(self._files)

    def load(self, index: int) -> Image.Image:
        """The RGB image of item ``index`` after the banner and box crops, before the transform."""
        path = str(self._files[index])
        image = read_image(path, "RGB")
        width, height = image.size
        bottom = height - self.crop_bottom
        if bottom < 1:
            raise ValueError(f"'{path}' is {height} px high: cannot cut off a {self.crop_bottom}-px banner")
        left, top, right = 0, 0, width
        if self.crop_to_box:
            x, y, w, h = self.boxes[index]
            left, top = max(0, math.floor(x)), max(0, math.floor(y))
            right, bottom = min(width, math.ceil(x + w)), min(bottom, math.ceil(y + h))
            if right - left < 1 or bottom - top < 1:
                raise ValueError(f"bounding box (x, y, w, h) = {tuple(self.boxes[index])} of '{path}' lies outside "
                                 f"its {width}×{height - self.crop_bottom} image")
        if (left, top, right, bottom) != (0, 0, width, height):
            image = image.crop((left, top, right, bottom))
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class FineGrainedDataModule(ZooDataModule):
    """Transforms, splits and loaders shared by the fine-grained datasets.

    Subclasses read a format: they implement ``_records(split) -> (files, labels, boxes)`` for ``split`` in
    ``{"train", "test"}`` (``boxes`` may be ``None`` unless ``crop_to_box``) and set ``num_classes`` and
    ``class_names``; ``_val_records()`` may return an official validation split.

    Args:
        root: where the dataset lives (see the subclass for which folder levels are accepted).
        image_size: side of the square crop fed to the network (448 in API-Net).
        resize: images are first resized to ``resize × resize``, ignoring the aspect ratio (512 in API-Net).
        hflip: random horizontal flip during training.
        mean, std: normalisation (ImageNet's, matching pretrained backbones).
        classes_per_batch: ``P`` of balanced ``P × K`` training batches (API-Net: 30 on CUB); ``None`` gives shuffled
            batches of ``batch_size``.
        images_per_class: ``K`` of balanced batches (API-Net: 4).
        val_fraction: 0 validates on the official validation split if the dataset has one, else on the test split
            (what papers report; take the last epoch, not the best). ``> 0`` holds out this fraction of every
            training class (seeded by ``seed``; every class keeps at least one training image).
        crop_to_box: crop every image (training and evaluation) to its bounding box; needs the box annotations.
        seed: seed of the hold-out and of the balanced sampler (independent of the training seed).
        batch_size: shuffled training batch size, and the evaluation batch size unless ``eval_batch_size`` is set.
        eval_batch_size, num_workers, pin_memory, predict_dir: see ``ZooDataModule``.
    """

    #: rows cut off at the bottom of every image (Aircraft's copyright banner)
    crop_bottom: int = 0

    def __init__(
        self,
        *,
        root: str,
        image_size: int = 448,
        resize: int = 512,
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        classes_per_batch: Optional[int] = None,
        images_per_class: int = 4,
        val_fraction: float = 0.0,
        crop_to_box: bool = False,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 4,
        pin_memory: bool = False,
        predict_dir: Optional[str] = None,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, predict_dir=predict_dir)
        if image_size > resize:
            raise ValueError(f"image_size ({image_size}) must not exceed resize ({resize}): it is a crop of the "
                             "resized image")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if classes_per_batch is not None and (classes_per_batch < 1 or images_per_class < 1):
            raise ValueError(f"classes_per_batch and images_per_class must be ≥ 1, got {classes_per_batch}, "
                             f"{images_per_class}")
        self.root = Path(root)
        self.image_size, self.resize, self.hflip = image_size, resize, hflip
        self.mean, self.std = tuple(mean), tuple(std)
        self.classes_per_batch, self.images_per_class = classes_per_batch, images_per_class
        self.val_fraction, self.crop_to_box, self.seed = val_fraction, crop_to_box, seed
        self.num_classes: Optional[int] = None
        self.class_names: list[str] = []

    # ---- format-specific ----
    def _records(self, split: str) -> Records:
        """``(files, labels, boxes)`` of ``split`` ("train" or "test"); sets ``num_classes`` and ``class_names``."""
        raise NotImplementedError

    def _val_records(self) -> Optional[Records]:
        """An official validation split, if the dataset has one (used when ``val_fraction`` is 0)."""
        return None

    # ---- shared ----
    def train_transform(self) -> Callable:
        flip = [v2.RandomHorizontalFlip()] if self.hflip else []
        return v2.Compose([v2.Resize((self.resize, self.resize), antialias=True), v2.RandomCrop(self.image_size),
                           *flip, *self._to_tensor()])

    def eval_transform(self) -> Callable:
        return v2.Compose([v2.Resize((self.resize, self.resize), antialias=True), v2.CenterCrop(self.image_size),
                           *self._to_tensor()])

    def predict_transform(self) -> Callable:
        """A ``predict_dir`` image as a test image (resize, centre crop, normalisation)."""
        return self.eval_transform()

    def _to_tensor(self) -> list[Callable]:
        return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def _dataset(self, records: Records, transform: Callable, keep: Optional[np.ndarray] = None) -> FineGrainedDataset:
        files, labels, boxes = records
        if keep is not None:
            files, labels = [files[i] for i in keep], [labels[i] for i in keep]
            boxes = None if boxes is None else [boxes[i] for i in keep]
        return FineGrainedDataset(files, labels, transform, boxes if self.crop_to_box else None, self.crop_to_box,
                                  self.crop_bottom)

    def _check(self, split: str, records: Records) -> None:
        files, labels, boxes = records
        if self.num_classes is None or len(self.class_names) != self.num_classes:
            raise RuntimeError(f"{type(self).__name__}._records must set num_classes and class_names")
        if not files:
            raise ValueError(f"{type(self).__name__}: the {split} split of '{self.root}' is empty")
        bad = [label for label in labels if not 0 <= label < self.num_classes]
        if bad:
            raise ValueError(f"{type(self).__name__}: {split} label {bad[0]} is outside 0..{self.num_classes - 1}")
        if self.crop_to_box and (boxes is None or len(boxes) != len(files)):
            raise ValueError(f"{type(self).__name__}: crop_to_box needs one bounding box per {split} image")
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise DatasetNotFoundError(f"{len(missing)} {split} image(s) listed by the annotations are missing, "
                                       f"e.g. '{missing[0]}'")

    def _holdout(self, labels: Sequence[int]) -> np.ndarray:
        """Boolean mask of the training items held out for validation: ``val_fraction`` of every class."""
        labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(labels, minlength=self.num_classes)
        held = np.minimum(np.floor(self.val_fraction * counts + 0.5), np.maximum(counts - 1, 0))
        # Items grouped by class in a seeded random order; the first `held[c]` of class c are held out.
        order = np.random.default_rng(self.seed).permutation(len(labels))
        order = order[np.argsort(labels[order], kind="stable")]
        rank = np.empty(len(labels), dtype=np.int64)
        rank[order] = np.arange(len(labels)) - (np.cumsum(counts) - counts)[labels[order]]
        return rank < held[labels]

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        train, test = self._records("train"), self._records("test")
        self._check("train", train)
        self._check("test", test)
        empty = np.flatnonzero(np.bincount(np.asarray(train[1]), minlength=self.num_classes) == 0)
        if len(empty):
            rank_zero_warn(f"{type(self).__name__}: {len(empty)} classes have no training image, "
                           f"e.g. '{self.class_names[empty[0]]}'")
        self.test_set = self._dataset(test, self.eval_transform())
        if self.val_fraction > 0:
            held = self._holdout(train[1])
            self.train_set = self._dataset(train, self.train_transform(), np.flatnonzero(~held))
            self.val_set = self._dataset(train, self.eval_transform(), np.flatnonzero(held))
        else:
            self.train_set = self._dataset(train, self.train_transform())
            val = self._val_records()
            if val is not None:
                self._check("val", val)
            self.val_set = self.test_set if val is None else self._dataset(val, self.eval_transform())

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of ``batch_size``, or with ``classes_per_batch`` set, ``P × K`` balanced batches
        (``BalancedClassSampler`` gives every DDP rank its own classes and the same number of batches)."""
        if self.classes_per_batch is None:
            return super().train_dataloader()
        dataset = self._require(self.train_set, "training")
        rank, world = self._world()
        sampler = BalancedClassSampler(dataset.labels, self.classes_per_batch, self.images_per_class, seed=self.seed,
                                       rank=rank, world_size=world)
        return self.batch_sampler_loader(dataset, sampler)


# ---------------------------------------------------------------------------------------------------------------------
# CUB-200-2011 and NABirds: whitespace-separated metadata files keyed by image id


def _read_table(path: Path, dataset: str, layout: str, how_to_get: str, fields: int) -> list[list[str]]:
    """The non-empty lines of ``path`` split into ``fields`` fields (the last one keeps its spaces)."""
    path = require_path(path, f"{dataset} metadata file '{path.name}'", layout, how_to_get)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = line.split(None, fields - 1)
        if len(row) != fields:
            raise ValueError(f"'{path}' line {number}: expected {fields} fields, got {line!r}")
        rows.append(row)
    return rows


_CUB_LAYOUT = """\
  <root>/CUB_200_2011/   (or point root at CUB_200_2011/ itself)
      images/<NNN.Class_name>/<name>.jpg
      images.txt                  '<image_id> <NNN.Class_name>/<name>.jpg'
      image_class_labels.txt      '<image_id> <class_id>'  (1-based)
      train_test_split.txt        '<image_id> <is_training_image>'
      classes.txt                 '<class_id> <NNN.Class_name>'
      bounding_boxes.txt          '<image_id> <x> <y> <width> <height>'  (needed only for crop_to_box)"""

_NABIRDS_LAYOUT = """\
  <root>/nabirds/   (or point root at nabirds/ itself)
      images/<NNNN>/<uuid>.jpg
      images.txt                  '<image_uuid> <NNNN>/<uuid>.jpg'
      image_class_labels.txt      '<image_uuid> <class_id>'
      train_test_split.txt        '<image_uuid> <is_training_image>'
      classes.txt                 '<class_id> <class name>'  (all hierarchy nodes; only classes with images are used)
      hierarchy.txt               '<child_class_id> <parent_class_id>'
      bounding_boxes.txt          '<image_uuid> <x> <y> <width> <height>'  (needed only for crop_to_box)"""


class _CUBFormatDataModule(FineGrainedDataModule):
    """CUB's metadata format, shared with NABirds; subclasses set the names below."""

    dataset_name = "CUB-200-2011"
    folder_name = "CUB_200_2011"
    layout = _CUB_LAYOUT
    how_to_get = ""
    #: True: only classes that label at least one image are kept (NABirds' classes.txt lists inner hierarchy nodes)
    used_classes_only = False

    def __init__(self, *, root: str, **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)
        self.class_ids: list[int] = []  # the dataset's own class id of every contiguous label
        self._splits: Optional[dict[str, Records]] = None

    def _dataset_dir(self) -> Path:
        root = require_path(self.root, self.dataset_name, self.layout, self.how_to_get)
        nested = root / self.folder_name
        return nested if nested.is_dir() else root

    def _table(self, folder: Path, name: str, fields: int) -> list[list[str]]:
        return _read_table(folder / name, self.dataset_name, self.layout, self.how_to_get, fields)

    def _read(self) -> dict[str, Records]:
        folder = self._dataset_dir()
        images = self._table(folder, "images.txt", 2)
        labels = dict(self._table(folder, "image_class_labels.txt", 2))
        is_train = dict(self._table(folder, "train_test_split.txt", 2))
        names = {int(cid): name for cid, name in self._table(folder, "classes.txt", 2)}
        boxes = None
        if self.crop_to_box:
            boxes = {}
            for image_id, *box in self._table(folder, "bounding_boxes.txt", 5):
                try:
                    boxes[image_id] = tuple(float(v) for v in box)
                except ValueError as err:
                    raise ValueError(f"{self.dataset_name}: '{folder / 'bounding_boxes.txt'}': {err}") from err

        ids = [image_id for image_id, _ in images]
        for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train),
                            ("bounding_boxes.txt", boxes)):
            if table is not None:
                absent = [i for i in ids if i not in table]
                if absent:
                    raise ValueError(f"{self.dataset_name}: '{folder / name}' has no entry for {len(absent)} image(s) "
                                     f"of images.txt, e.g. image id {absent[0]}")
        image_classes = [int(labels[i]) for i in ids]
        unknown = sorted(set(image_classes) - names.keys())
        if unknown:
            raise ValueError(f"{self.dataset_name}: '{folder / 'image_class_labels.txt'}' uses class id {unknown[0]} "
                             f"that '{folder / 'classes.txt'}' does not list")
        flags = {is_train[i] for i in ids}
        if not flags <= {"0", "1"}:
            raise ValueError(f"{self.dataset_name}: '{folder / 'train_test_split.txt'}' must flag images 0 or 1, "
                             f"found {sorted(flags - {'0', '1'})[:3]}")

        self.class_ids = sorted(set(image_classes) if self.used_classes_only else names)
        self.class_names = [names[c] for c in self.class_ids]
        self.num_classes = len(self.class_ids)
        label_of = {c: label for label, c in enumerate(self.class_ids)}
        splits: dict[str, Records] = {}
        for split, flag in (("train", "1"), ("test", "0")):
            chosen = [k for k, i in enumerate(ids) if is_train[i] == flag]
            splits[split] = ([folder / "images" / images[k][1] for k in chosen],
                             [label_of[image_classes[k]] for k in chosen],
                             None if boxes is None else [boxes[ids[k]] for k in chosen])
        return splits

    def _records(self, split: str) -> Records:
        if self._splits is None:
            self._splits = self._read()  # all metadata files hold both splits: parse them once
        return self._splits[split]


class CUBDataModule(_CUBFormatDataModule):
    """Caltech-UCSD Birds-200-2011 (Wah et al. 2011): 200 species, 5,994 training and 5,794 test images.

    Args:
        root: the folder holding ``CUB_200_2011/``, or ``CUB_200_2011/`` itself.
        **kwargs: see ``FineGrainedDataModule`` (``crop_to_box`` reads ``bounding_boxes.txt``).
    """

    dataset_name = "CUB-200-2011"
    folder_name = "CUB_200_2011"
    layout = _CUB_LAYOUT
    how_to_get = ("download CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vp158 and unpack it into "
                  "<root>")

    def __init__(self, *, root: str = "data/cub", **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)


class NABirdsDataModule(_CUBFormatDataModule):
    """NABirds (Van Horn et al. 2015): 555 leaf classes, 23,929 training and 24,633 test images.

    ``classes.txt`` lists every node of the class hierarchy; the classes that label images are relabelled
    ``0..554`` in increasing class-id order, ``class_ids`` keeps the dataset's ids and ``class_names`` their names.

    Args:
        root: the folder holding ``nabirds/``, or ``nabirds/`` itself.
        **kwargs: see ``FineGrainedDataModule``.
    """

    dataset_name = "NABirds"
    folder_name = "nabirds"
    layout = _NABIRDS_LAYOUT
    how_to_get = ("request nabirds.tar.gz at https://dl.allaboutbirds.org/nabirds (free for research, after accepting "
                  "the terms of use) and unpack it into <root>")
    used_classes_only = True

    def __init__(self, *, root: str = "data/nabirds", **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# FGVC-Aircraft

_AIRCRAFT_LAYOUT = """\
  <root>/fgvc-aircraft-2013b/data/   (or point root at fgvc-aircraft-2013b/ or at data/ itself)
      images/<7-digit id>.jpg
      images_<level>_{train,val,trainval,test}.txt   '<id> <class name>'  (names may contain spaces)
      variants.txt | families.txt | manufacturers.txt   one class name per line (defines the label order)
      images_box.txt              '<id> <xmin> <ymin> <xmax> <ymax>'  (1-based; needed only for crop_to_box)
  level: variant | family | manufacturer"""

_AIRCRAFT_HOW = ("download fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ and "
                 "unpack it into <root> (torchvision.datasets.FGVCAircraft(download=True) writes the same layout)")

_AIRCRAFT_CLASS_FILES = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}


class FGVCAircraftDataModule(FineGrainedDataModule):
    """FGVC-Aircraft 2013b (Maji et al. 2013): 100 variants (70 families, 30 manufacturers), 6,667 trainval and
    3,333 test images.

    Args:
        root: the folder holding ``fgvc-aircraft-2013b/``, that folder, or its ``data/`` folder.
        annotation_level: ``variant`` (the usual benchmark), ``family`` or ``manufacturer``.
        train_split: ``trainval`` (what papers train on; validation then runs on the test split) or ``train`` (the
            official ``val`` split becomes the validation set, unless ``val_fraction > 0``).
        crop_bottom: rows cut off at the bottom of every image: the release's 20-pixel copyright banner.
        **kwargs: see ``FineGrainedDataModule`` (``crop_to_box`` reads ``images_box.txt``).
    """

    def __init__(
        self,
        *,
        root: str = "data/fgvc-aircraft",
        annotation_level: str = "variant",
        train_split: str = "trainval",
        crop_bottom: int = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        if annotation_level not in _AIRCRAFT_CLASS_FILES:
            raise ValueError(f"annotation_level must be one of {list(_AIRCRAFT_CLASS_FILES)}, got {annotation_level!r}")
        if train_split not in ("train", "trainval"):
            raise ValueError(f"train_split must be 'train' or 'trainval', got {train_split!r}")
        if crop_bottom < 0:
            raise ValueError(f"crop_bottom must be ≥ 0, got {crop_bottom}")
        self.annotation_level, self.train_split, self.crop_bottom = annotation_level, train_split, crop_bottom
        self._boxes: Optional[dict[str, tuple[float, float, float, float]]] = None

    def _data_dir(self) -> Path:
        root = require_path(self.root, "FGVC-Aircraft", _AIRCRAFT_LAYOUT, _AIRCRAFT_HOW)
        for candidate in (root / "fgvc-aircraft-2013b" / "data", root / "data"):
            if candidate.is_dir():
                return candidate
        return root

    def _file(self, folder: Path, name: str) -> Path:
        return require_path(folder / name, f"FGVC-Aircraft metadata file '{name}'", _AIRCRAFT_LAYOUT, _AIRCRAFT_HOW)

    def _read_classes(self, folder: Path) -> None:
        path = self._file(folder, _AIRCRAFT_CLASS_FILES[self.annotation_level])
        self.class_names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"FGVC-Aircraft: '{path}' lists a class twice")
        self.num_classes = len(self.class_names)

    def _read_boxes(self, folder: Path) -> dict[str, tuple[float, float, float, float]]:
        if self._boxes is None:
            rows = _read_table(folder / "images_box.txt", "FGVC-Aircraft", _AIRCRAFT_LAYOUT, _AIRCRAFT_HOW, 5)
            # 1-based inclusive corners (the release README: the top-left pixel is (1, 1)) to 0-based (x, y, w, h)
            self._boxes = {}
            for image_id, *corners in rows:
                x1, y1, x2, y2 = (float(v) for v in corners)
                self._boxes[image_id] = (x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1)
        return self._boxes

    def _split(self, split: str) -> Records:
        folder = self._data_dir()
        self._read_classes(folder)
        label_of = {name: label for label, name in enumerate(self.class_names)}
        path = self._file(folder, f"images_{self.annotation_level}_{split}.txt")
        files, labels, ids = [], [], []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, name = line.strip().partition(" ")  # the class name may contain spaces
            if name not in label_of:
                raise ValueError(f"FGVC-Aircraft: '{path}' line {number} has class {name!r}, which "
                                 f"'{folder / _AIRCRAFT_CLASS_FILES[self.annotation_level]}' does not list")
            ids.append(image_id)
            files.append(folder / "images" / f"{image_id}.jpg")
            labels.append(label_of[name])
        boxes = None
        if self.crop_to_box:
            table = self._read_boxes(folder)
            absent = [i for i in ids if i not in table]
            if absent:
                raise ValueError(f"FGVC-Aircraft: '{folder / 'images_box.txt'}' has no box for image {absent[0]}")
            boxes = [table[i] for i in ids]
        return files, labels, boxes

    def _records(self, split: str) -> Records:
        return self._split(self.train_split if split == "train" else split)

    def _val_records(self) -> Optional[Records]:
        return self._split("val") if self.train_split == "train" else None


# ---------------------------------------------------------------------------------------------------------------------
# Stanford Cars

_CARS_LAYOUT = """\
  <root>/   (or <root>/stanford_cars/, as torchvision.datasets.StanfordCars expects)
      devkit/cars_meta.mat               class_names (196)
      devkit/cars_train_annos.mat        annotations: bbox_x1, bbox_y1, bbox_x2, bbox_y2, class (1-based), fname
      cars_test_annos_withlabels.mat     the same fields for the test images
      cars_train/<fname>.jpg
      cars_test/<fname>.jpg"""

_CARS_HOW = ("the original site (https://ai.stanford.edu/~jkrause/cars/car_dataset.html) is offline: get "
             "cars_train.tgz, cars_test.tgz, car_devkit.tgz and cars_test_annos_withlabels.mat from a mirror "
             "(e.g. Kaggle's 'stanford-cars-dataset') and arrange them as above")

_CARS_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


class StanfordCarsDataModule(FineGrainedDataModule):
    """Stanford Cars (Krause et al. 2013): 196 car models, 8,144 training and 8,041 test images.

    Args:
        root: the dataset folder in torchvision's ``StanfordCars`` layout, or the folder holding ``stanford_cars/``.
        **kwargs: see ``FineGrainedDataModule``.
    """

    def __init__(self, *, root: str = "data/stanford_cars", **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)

    def _base(self) -> Path:
        root = require_path(self.root, "Stanford Cars", _CARS_LAYOUT, _CARS_HOW)
        nested = root / "stanford_cars"
        return nested if nested.is_dir() else root

    @staticmethod
    def _loadmat(path: Path, key: str) -> np.ndarray:
        from scipy.io import loadmat  # scipy only for this dataset

        path = require_path(path, f"Stanford Cars annotation file '{path.name}'", _CARS_LAYOUT, _CARS_HOW)
        try:
            content = loadmat(str(path), squeeze_me=True)
        except (ValueError, TypeError, OSError, NotImplementedError) as err:
            raise ValueError(f"Stanford Cars: cannot read '{path}' as a MATLAB file: {err}") from err
        if key not in content:
            found = sorted(k for k in content if not k.startswith("__"))
            raise ValueError(f"Stanford Cars: '{path}' has no '{key}' variable (found {found})")
        return np.atleast_1d(content[key])  # squeeze_me turns a one-element array into a scalar

    def _records(self, split: str) -> Records:
        base = self._base()
        self.class_names = [str(name) for name in self._loadmat(base / "devkit" / "cars_meta.mat", "class_names")]
        self.num_classes = len(self.class_names)
        if split == "train":
            path, images = base / "devkit" / "cars_train_annos.mat", base / "cars_train"
        else:
            path, images = base / "cars_test_annos_withlabels.mat", base / "cars_test"
        annotations = self._loadmat(path, "annotations")
        missing = [f for f in _CARS_FIELDS if f not in (annotations.dtype.names or ())]
        if missing:
            raise ValueError(f"Stanford Cars: the annotations in '{path}' lack the field(s) {missing}"
                             + (" (cars_test_annos.mat has no labels: use cars_test_annos_withlabels.mat)"
                                if missing == ["class"] else ""))
        classes = annotations["class"].astype(np.int64)
        outside = classes[(classes < 1) | (classes > self.num_classes)]
        if len(outside):
            raise ValueError(f"Stanford Cars: '{path}' has class {int(outside[0])}, outside 1..{self.num_classes} "
                             f"of '{base / 'devkit' / 'cars_meta.mat'}'")
        x1, y1, x2, y2 = (annotations[f].astype(np.float64) for f in _CARS_FIELDS[:4])
        # MATLAB's 1-based inclusive corners to 0-based (x, y, w, h)
        boxes = np.stack([x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], axis=1)
        files = [images / str(name) for name in annotations["fname"]]
        return files, (classes - 1).tolist(), [tuple(b) for b in boxes.tolist()]


# ---------------------------------------------------------------------------------------------------------------------
# The embedded default


class ToyBirdsDataModule(CUBDataModule):
    """The embedded default: procedural "toy birds" (``datamodules.generated.finegrained_toybirds``) in CUB-200-2011's
    layout, no download.

    Twelve classes that differ in one small part each (beak colour × wing bars × tail shape) on cluttered
    backgrounds; written to ``root`` on first use (deterministic from ``bird_seed``, a few seconds) and read back by
    the CUB parser.

    Args:
        root: where the set is written (``<root>/CUB_200_2011``).
        bird_size: side of the written JPEGs.
        train_per_class, test_per_class, bird_seed: the generator's parameters.
        image_size, resize, ...: see ``FineGrainedDataModule`` (defaults scaled to the 64-px images).
    """

    def __init__(
        self,
        *,
        root: str = "data/toybirds",
        bird_size: int = 64,
        train_per_class: int = 64,
        test_per_class: int = 16,
        bird_seed: int = 0,
        image_size: int = 56,
        resize: int = 64,
        batch_size: int = 32,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, image_size=image_size, resize=resize, batch_size=batch_size,
                         num_workers=num_workers, **kwargs)
        self.bird_args = dict(image_size=bird_size, train_per_class=train_per_class, test_per_class=test_per_class,
                              seed=bird_seed)

    def prepare_data(self) -> None:
        write_toy_birds(self.root, **self.bird_args)

    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare_data()  # a no-op once the set is installed (e.g. when prepare_data already ran on this node)
        super().setup(stage)
