"""The detection DataModules: COCO, Pascal VOC and the embedded digits-on-canvas set (read as COCO).

``zoo predict`` runs on the test split, or with ``predict_dir`` on a folder of one's own images: each is read as RGB
(grey-scale files, like the digit canvases, are repeated over three channels exactly as the splits read them) and
resized as the test split is (``image_transform``); batches keep every image's own size (``image_file_collate``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from datamodules.base import ZooDataModule, require_path
from datamodules.detection.coco import COCO_HOW_TO_GET, COCO_LAYOUT, CocoDetection
from datamodules.detection.records import DetectionDataset
from datamodules.detection.sampler import AspectRatioBatchSampler
from datamodules.detection.transforms import detection_collate, detection_transform, image_file_collate, image_transform
from datamodules.detection.voc import VOC_CLASSES, VOCDetection, parse_voc_set_name
from datamodules.generated.detection_digit_canvas import write_digit_canvas

__all__ = ["DetectionDataModule", "CocoDetectionDataModule", "VOCDetectionDataModule", "DigitCanvasFiles",
           "DigitCanvasDataModule"]


class DetectionDataModule(ZooDataModule):
    """What the detection DataModules share: transforms, the grouped and sharded training loader, strided evaluation.

    Subclasses implement ``_build(split, transform)`` (``split`` in ``"train"``, ``"val"``, ``"test"``) and
    ``class_names``.

    Args:
        train_min_size: shorter side(s) of training images (a list: drawn per image, multi-scale).
        min_size: shorter side of evaluation images.
        max_size: cap of the longer side.
        flip_prob: horizontal-flip probability in training.
        group_aspect_ratio: batch landscape and portrait images separately (``AspectRatioBatchSampler``).
        batch_size, eval_batch_size, num_workers, pin_memory: see ``ZooDataModule``.
        seed: with the epoch, fixes the training order; the same on every rank.
        predict_dir: a folder of images (any depth) for ``zoo predict``, read as RGB and resized like the test
            split; ``None``: predict on the test split.
    """

    def __init__(self, *, train_min_size: int | list[int] = 800, min_size: int = 800, max_size: int = 1333,
                 flip_prob: float = 0.5, group_aspect_ratio: bool = True, batch_size: int = 2,
                 eval_batch_size: Optional[int] = None, num_workers: int = 0, pin_memory: bool = False,
                 seed: int = 0, predict_dir: Optional[str] = None) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, predict_dir=predict_dir)
        self.train_min_size = train_min_size if isinstance(train_min_size, int) else list(train_min_size)
        self.min_size, self.max_size, self.flip_prob = min_size, max_size, flip_prob
        self.group_aspect_ratio, self.seed = group_aspect_ratio, seed

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} must define class_names")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def category_ids(self) -> list[int]:
        """The category id ``zoo predict`` writes in ``results.json`` for each label: ``1..C`` in label order here
        (VOC: ``VOC_CLASSES`` order); COCO-format sets map back to their own, possibly sparse, ids."""
        return list(range(1, self.num_classes + 1))

    def train_transform(self) -> v2.Compose:
        return detection_transform(True, self.train_min_size, self.max_size, self.flip_prob)

    def eval_transform(self) -> v2.Compose:
        return detection_transform(False, self.min_size, self.max_size)

    def predict_transform(self) -> v2.Compose:
        """A ``predict_dir`` image (PIL, RGB) → the test split's input: the same shorter-side resize, float in [0, 1]."""
        return image_transform(self.min_size, self.max_size)

    def _build(self, split: str, transform: Callable) -> DetectionDataset:
        raise NotImplementedError(f"{type(self).__name__} must implement _build(split, transform)")

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._build("train", self.train_transform())
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._build("val", self.eval_transform())
        predicts_on_a_folder = stage == "predict" and self.predict_dir is not None  # the test split is not needed
        if stage in (None, "test", "predict") and self.test_set is None and not predicts_on_a_folder:
            self.test_set = self._build("test", self.eval_transform())

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_set, "training")
        rank, world = self._world()
        ratios = dataset.aspect_ratios if self.group_aspect_ratio else torch.ones(len(dataset))
        sampler = AspectRatioBatchSampler(ratios, self.batch_size, shuffle=True, seed=self.seed, drop_last=False,
                                          rank=rank, world_size=world)
        return self.batch_sampler_loader(dataset, sampler, collate_fn=detection_collate)

    # Evaluation (the base's eval loaders): rank r of w evaluates images r, r + w, ...; `image_id` identifies them
    # for DetectionMetrics.
    eval_collate_fn = staticmethod(detection_collate)

    def predict_dataloader(self) -> DataLoader:
        """The test split (``(images, targets)`` batches), or with ``predict_dir`` its images in batches of
        ``image_file_collate`` (images of different sizes cannot be stacked), sharded like the evaluation loaders."""
        if self.predict_dir is None:
            return super().predict_dataloader()
        return self.eval_loader(self.predict_sets(), collate_fn=image_file_collate)


class CocoDetectionDataModule(DetectionDataModule):
    """COCO (or any COCO-format set): image folders and ``instances_*.json`` under ``root``.

    Training skips images without a non-crowd box; validation and test keep every image. ``category_ids`` maps
    labels back to COCO category ids (for COCO-style result files).

    Args:
        root: the dataset folder (``data/coco``).
        train_images, train_annotations, val_images, val_annotations: paths relative to ``root``.
        test_images, test_annotations: default: the validation ones.
        predict_dir: a folder of images for ``zoo predict`` (see ``DetectionDataModule``).
        **kwargs: see ``DetectionDataModule`` (COCO's 800 / 1333 sizes are its defaults).
    """

    def __init__(
        self,
        *,
        root: str = "data/coco",
        train_images: str = "train2017",
        train_annotations: str = "annotations/instances_train2017.json",
        val_images: str = "val2017",
        val_annotations: str = "annotations/instances_val2017.json",
        test_images: Optional[str] = None,
        test_annotations: Optional[str] = None,
        predict_dir: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(predict_dir=predict_dir, **kwargs)
        self.root = Path(root)
        self.files = {
            "train": (train_images, train_annotations),
            "val": (val_images, val_annotations),
            "test": (test_images or val_images, test_annotations or val_annotations),
        }
        self._categories: Optional[tuple[list[int], list[str]]] = None

    def _root(self) -> Path:
        return require_path(self.root, "COCO", COCO_LAYOUT, COCO_HOW_TO_GET)

    def _build(self, split: str, transform: Callable) -> CocoDetection:
        images, annotations = self.files[split]
        root = self._root()
        dataset = CocoDetection(root / images, root / annotations, transform, skip_empty=split == "train")
        if self._categories is not None and self._categories != (dataset.category_ids, dataset.class_names):
            raise ValueError(f"'{root / annotations}' has other categories than the other splits of {root}")
        self._categories = (dataset.category_ids, dataset.class_names)
        return dataset

    def _load_categories(self) -> tuple[list[int], list[str]]:
        if self._categories is None:
            path = require_path(self._root() / self.files["val"][1], "COCO annotation file", COCO_LAYOUT,
                                COCO_HOW_TO_GET)
            with open(path) as handle:
                categories = sorted(json.load(handle)["categories"], key=lambda c: c["id"])
            self._categories = ([int(c["id"]) for c in categories], [str(c.get("name", c["id"])) for c in categories])
        return self._categories

    @property
    def category_ids(self) -> list[int]:
        """The COCO category id of every label (reads the validation json if no split is set up yet)."""
        return self._load_categories()[0]

    @property
    def class_names(self) -> list[str]:
        return self._load_categories()[1]


class VOCDetectionDataModule(DetectionDataModule):
    """Pascal VOC from ``VOCdevkit``: by default the 07+12 trainval protocol, tested on VOC2007 test.

    Args:
        root: the ``VOCdevkit`` folder.
        train_sets: ``"<year>/<split>"`` sets concatenated for training.
        val_set, test_set: the evaluation sets.
        download: fetch the missing sets' tars (VOC2007 trainval/test, VOC2012 trainval) with torchvision's
            ``VOCDetection`` into ``root``'s parent (about 3.6 GB); off by default, nothing is downloaded unless asked.
        train_min_size, min_size, max_size: 600 / 1000 as in Faster R-CNN's VOC setting.
        predict_dir: a folder of images for ``zoo predict`` (see ``DetectionDataModule``).
        **kwargs: see ``DetectionDataModule``.
    """

    def __init__(
        self,
        *,
        root: str = "data/VOCdevkit",
        train_sets: list[str] = ["2007/trainval", "2012/trainval"],  # noqa: B006 (copied, never mutated)
        val_set: str = "2007/test",
        test_set: str = "2007/test",
        train_min_size: int | list[int] = 600,
        min_size: int = 600,
        max_size: int = 1000,
        download: bool = False,
        predict_dir: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_min_size=train_min_size, min_size=min_size, max_size=max_size, predict_dir=predict_dir,
                         **kwargs)
        self.root = Path(root)
        self.download = download
        self.sets = {"train": list(train_sets), "val": [val_set], "test": [test_set]}
        for names in self.sets.values():
            for name in names:
                parse_voc_set_name(name)

    @property
    def class_names(self) -> list[str]:
        return list(VOC_CLASSES)

    def prepare_data(self) -> None:
        if not self.download:
            return
        import torchvision

        if self.root.name != "VOCdevkit":
            raise ValueError(f"download: true needs root to end in 'VOCdevkit' (torchvision writes there), got {self.root}")
        for name in sorted({n for names in self.sets.values() for n in names}):
            year, split = parse_voc_set_name(name)
            if not (self.root / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt").exists():
                torchvision.datasets.VOCDetection(str(self.root.parent), year=year, image_set=split, download=True)

    def _build(self, split: str, transform: Callable) -> VOCDetection:
        return VOCDetection(self.root, self.sets[split], transform)


class DigitCanvasFiles:
    """What the digit-canvas DataModules share (mixed in before a COCO-format DataModule that sets ``root`` and
    ``generation``): the 10 digit classes, and the set written by ``write_digit_canvas`` on first use."""

    root: Path
    generation: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return [str(d) for d in range(10)]

    @property
    def category_ids(self) -> list[int]:
        return list(range(1, 11))

    def prepare_data(self) -> None:
        write_digit_canvas(self.root, **self.generation)

    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare_data()  # a no-op when the set is there (e.g. prepare_data already ran on this node)
        super().setup(stage)


class DigitCanvasDataModule(DigitCanvasFiles, CocoDetectionDataModule):
    """The embedded default: ``write_digit_canvas`` writes the set under ``root`` (COCO format) on first use, and it is
    read through ``CocoDetection`` exactly like COCO. 10 classes, the digits "0".."9".

    Canvases are already square and small: by default no resize (``min_size = max_size = canvas_size``), no flip
    (a mirrored digit is another glyph) and no aspect grouping.

    Args:
        root: where the set is written.
        generator_seed: fixes the set (``write_digit_canvas``'s ``seed``).
        canvas_size, num_train, num_val, num_test, min_digit, max_digit, max_digits, noise: see
            ``write_digit_canvas``.
        train_min_size, min_size, max_size: default ``canvas_size``.
        flip_prob, group_aspect_ratio, batch_size: no flip, no grouping, 16 canvases.
        predict_dir: a folder of images for ``zoo predict``; the canvases are grey-scale PNGs, read as RGB (the
            grey repeated) exactly as the splits read them, and resized like the test split (the shorter side to
            ``min_size``, by default ``canvas_size``).
        **kwargs: see ``DetectionDataModule``.
    """

    def __init__(
        self,
        *,
        root: str = "data/digit_canvas",
        generator_seed: int = 0,
        canvas_size: int = 128,
        num_train: int = 1000,
        num_val: int = 200,
        num_test: int = 200,
        min_digit: int = 16,
        max_digit: int = 40,
        max_digits: int = 4,
        noise: float = 0.3,
        train_min_size: Optional[int | list[int]] = None,
        min_size: Optional[int] = None,
        max_size: Optional[int] = None,
        flip_prob: float = 0.0,
        group_aspect_ratio: bool = False,
        batch_size: int = 16,
        predict_dir: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, train_images="train", train_annotations="annotations/instances_train.json",
                         val_images="val", val_annotations="annotations/instances_val.json", test_images="test",
                         test_annotations="annotations/instances_test.json",
                         train_min_size=canvas_size if train_min_size is None else train_min_size,
                         min_size=min_size or canvas_size, max_size=max_size or canvas_size, flip_prob=flip_prob,
                         group_aspect_ratio=group_aspect_ratio, batch_size=batch_size, predict_dir=predict_dir,
                         **kwargs)
        self.generation = dict(seed=generator_seed, canvas_size=canvas_size, num_train=num_train, num_val=num_val,
                               num_test=num_test, min_digit=min_digit, max_digit=max_digit, max_digits=max_digits,
                               noise=noise)
