"""Object-detection data: COCO and Pascal VOC in their real formats, and an embedded procedural default.

Every dataset returns ``(image, target)``: ``image`` a float32 ``(3, H, W)`` RGB tensor in [0, 1] (not normalised;
grayscale files become RGB) and ``target`` a dict

    boxes      float32 (N, 4)  xyxy pixels of the transformed image, clamped to it, degenerate boxes removed
    labels     int64   (N,)    contiguous class ids 0..C-1
    iscrowd    bool    (N,)    COCO ``iscrowd=1`` / VOC ``difficult=1``: not trained on, ignored by evaluation
    image_id   int64   ()      COCO image id; VOC: the index in the (concatenated) split
    orig_size  int64   (2,)    (h, w) of the image file, before resizing: predictions are rescaled to it

``detection_collate`` keeps the variable sizes: a batch is ``(list of images, list of targets)``; models pad.

On-disk formats:

    COCO (cocodataset.org)                               Pascal VOC (host.robots.ox.ac.uk/pascal/VOC)
    <root>/train2017/000000000009.jpg                    <root>/VOC2007/Annotations/000005.xml
    <root>/val2017/000000000139.jpg                      <root>/VOC2007/JPEGImages/000005.jpg
    <root>/annotations/instances_{train,val}2017.json    <root>/VOC2007/ImageSets/Main/{trainval,test}.txt

COCO boxes are ``[x, y, width, height]``; the sparse category ids (1..90) become labels 0..79 in sorted-id order
(``category_ids`` maps back). VOC boxes are 1-based pixel indices; they become ``x1 = xmin - 1 ... x2 = xmax - 1``
as in py-faster-rcnn, and the classes are the 20 standard ones in the standard order (``VOC_CLASSES``).

Transforms (``detection_transform``): training resizes the shorter side to a size drawn from ``train_min_size``
(multi-scale when a list) with the longer side capped at ``max_size``, then flips horizontally with ``flip_prob``;
evaluation resizes the shorter side to ``min_size`` (longer side capped). Both clamp the boxes to the image and drop
the degenerate ones (together with their labels and ``iscrowd``). A resize to the size an image already has is
skipped.

Training batches hold only landscape (w ≥ h) or only portrait images (``AspectRatioBatchSampler``, as torchvision's
``GroupedBatchSampler``), so little padding is wasted; the DataModules shard training and evaluation across DDP ranks
themselves (configs set ``trainer.use_distributed_sampler: false``).

``DigitCanvasDataModule`` is the embedded default: ``write_digit_canvas`` pastes scikit-learn's bundled 8×8 digits on
noisy canvases and writes them as a real COCO-format set, which is then read by the same ``CocoDetection`` code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from datamodules.base import DatasetNotFoundError, ZooDataModule, read_image, require_path
from datamodules.sampler import EpochBatchSampler, dist_rank_world, seeded_generator

__all__ = [
    "VOC_CLASSES", "COCO_LAYOUT", "VOC_LAYOUT", "DetectionRecords", "DetectionDataset", "CocoDetection",
    "VOCDetection", "ResizeShortestSide", "detection_transform", "detection_collate", "AspectRatioBatchSampler",
    "DetectionDataModule", "CocoDetectionDataModule", "VOCDetectionDataModule", "write_digit_canvas",
    "DigitCanvasDataModule",
]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

COCO_LAYOUT = """\
  coco/train2017/000000000009.jpg ...              training images
  coco/val2017/000000000139.jpg ...                validation images
  coco/annotations/instances_train2017.json        training boxes (COCO object-detection json)
  coco/annotations/instances_val2017.json          validation boxes"""
COCO_HOW_TO_GET = ("https://cocodataset.org/#download: '2017 Train images', '2017 Val images' and '2017 Train/Val "
                   "annotations', unzipped into the root")

VOC_LAYOUT = """\
  VOCdevkit/VOC2007/Annotations/000005.xml ...     one xml per image (size, objects with name, difficult, bndbox)
  VOCdevkit/VOC2007/JPEGImages/000005.jpg ...      the images
  VOCdevkit/VOC2007/ImageSets/Main/trainval.txt    image ids of a split, one per line (also test.txt)
  VOCdevkit/VOC2012/...                            the same for 2012 (trainval only)"""
VOC_HOW_TO_GET = ("http://host.robots.ox.ac.uk/pascal/VOC/: VOCtrainval_06-Nov-2007.tar, VOCtest_06-Nov-2007.tar and "
                  "VOCtrainval_11-May-2012.tar, all extracted into the same VOCdevkit/")


# ---------------------------------------------------------------------------------------------------------------------
# Records and datasets


class DetectionRecords(NamedTuple):
    """The parsed annotations of a detection set, compact (one array per field, not one object per box).

    Image ``i`` owns the boxes ``offsets[i] : offsets[i + 1]``.

    Attributes:
        paths: image file of every image.
        sizes: ``(num_images, 2)`` int64 ``(h, w)`` from the annotation files (no decoding).
        image_ids: ``(num_images,)`` int64.
        boxes: ``(num_boxes, 4)`` float32 xyxy in pixels of the image file.
        labels: ``(num_boxes,)`` int64, contiguous.
        crowd: ``(num_boxes,)`` bool.
        offsets: ``(num_images + 1,)`` int64.
    """

    paths: list[str]
    sizes: np.ndarray
    image_ids: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    crowd: np.ndarray
    offsets: np.ndarray


def _records(paths: list[str], sizes: list[tuple[int, int]], image_ids: list[int], boxes: list[np.ndarray],
             labels: list[np.ndarray], crowd: list[np.ndarray]) -> DetectionRecords:
    counts = np.array([len(b) for b in boxes], dtype=np.int64)
    return DetectionRecords(
        paths=paths,
        sizes=np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
        image_ids=np.asarray(image_ids, dtype=np.int64),
        boxes=np.concatenate(boxes).astype(np.float32).reshape(-1, 4) if boxes else np.zeros((0, 4), np.float32),
        labels=np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64),
        crowd=np.concatenate(crowd).astype(bool) if crowd else np.zeros(0, bool),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
    )


class DetectionDataset(Dataset):
    """``(image, target)`` pairs of parsed ``DetectionRecords`` (see the module docstring for the target dict).

    Args:
        records: the parsed set.
        class_names: name of every contiguous label.
        transform: called as ``transform(image, target)`` on a ``tv_tensors.Image`` (uint8) and a target whose
            ``boxes`` are ``tv_tensors.BoundingBoxes``; default ``detection_transform(train=False)`` (no resize).
    """

    def __init__(self, records: DetectionRecords, class_names: Sequence[str], transform: Optional[Callable] = None) -> None:
        self.records = records
        self.class_names = list(class_names)
        self.transform = transform if transform is not None else detection_transform(train=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records.paths)

    @property
    def aspect_ratios(self) -> torch.Tensor:
        """``w / h`` of every image, from the annotation files (no decoding)."""
        sizes = torch.from_numpy(self.records.sizes).double()
        return sizes[:, 1] / sizes[:, 0]

    def annotations(self, index: int) -> dict[str, torch.Tensor]:
        """The raw boxes (xyxy in pixels of the file), labels and crowd flags of image ``index``, untransformed."""
        start, end = self.records.offsets[index], self.records.offsets[index + 1]
        return {"boxes": torch.from_numpy(self.records.boxes[start:end].copy()),
                "labels": torch.from_numpy(self.records.labels[start:end].copy()),
                "iscrowd": torch.from_numpy(self.records.crowd[start:end].copy())}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pil = read_image(self.records.paths[index])
        width, height = pil.size
        raw = self.annotations(index)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(raw["boxes"], format=tv_tensors.BoundingBoxFormat.XYXY,
                                              canvas_size=(height, width)),
            "labels": raw["labels"],
            "iscrowd": raw["iscrowd"],
            "image_id": torch.tensor(int(self.records.image_ids[index]), dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }
        image, target = self.transform(F.pil_to_tensor(pil).as_subclass(tv_tensors.Image), target)
        if image.dtype != torch.float32:
            image = F.to_dtype(image, torch.float32, scale=True)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4)
        return image.as_subclass(torch.Tensor), target


def _is_bbox(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)


def _coco_error(json_path: Path, image_id: Any, message: str) -> ValueError:
    return ValueError(f"'{json_path}': image {image_id}: {message}")


def parse_coco(annotations: str | Path, images: str | Path, skip_empty: bool = False
               ) -> tuple[DetectionRecords, list[int], list[str]]:
    """Read a COCO object-detection json with the standard library: ``(records, category_ids, class_names)``.

    Images come in increasing id order. Annotations are grouped by image once; each image's boxes are then checked
    and converted together. Zero-area boxes (width or height 0, present in real COCO) are dropped silently.

    Args:
        annotations: the json file.
        images: the folder the ``file_name`` entries are relative to.
        skip_empty: drop images without a non-crowd box (for training).

    Raises:
        ValueError: naming the json file and the image id, for a bbox that is not 4 finite numbers with width and
            height ≥ 0, an unknown ``category_id``, an annotation of an image id that is not in ``images``, or an
            image entry without ``file_name``/``width``/``height``.
    """
    json_path, image_dir = Path(annotations), Path(images)
    try:
        with open(json_path) as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"'{json_path}' is not valid json: {err}") from err
    if not isinstance(data, dict) or not all(key in data for key in ("images", "categories")):
        raise ValueError(f"'{json_path}' is not a COCO detection file (needs 'images', 'categories', 'annotations')")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    category_ids = [int(c["id"]) for c in categories]
    class_names = [str(c.get("name", c["id"])) for c in categories]
    label_of = {cid: label for label, cid in enumerate(category_ids)}

    image_entries = sorted(data["images"], key=lambda entry: entry["id"])
    by_image: dict[Any, list[dict]] = {entry["id"]: [] for entry in image_entries}
    for ann in data.get("annotations", []):
        owner = by_image.get(ann.get("image_id"))
        if owner is None:
            raise _coco_error(json_path, ann.get("image_id"),
                              f"annotation {ann.get('id')} refers to an image id that is not in 'images'")
        owner.append(ann)

    paths, sizes, ids, all_boxes, all_labels, all_crowd = [], [], [], [], [], []
    for entry in image_entries:
        image_id = entry["id"]
        try:
            path, size = str(image_dir / entry["file_name"]), (int(entry["height"]), int(entry["width"]))
        except (KeyError, TypeError, ValueError) as err:
            raise _coco_error(json_path, image_id, f"image entry needs file_name, width and height ({err})") from err
        anns = by_image[image_id]
        bbox = np.zeros((0, 4))
        if anns:
            try:
                bbox = np.asarray([ann["bbox"] for ann in anns], dtype=np.float64)
            except (KeyError, TypeError, ValueError):
                bbox = np.zeros((0, 3))  # ragged / non-numeric: reported below
        if bbox.ndim != 2 or bbox.shape[1] != 4 or (anns and len(bbox) != len(anns)):
            bad = next((a for a in anns if not _is_bbox(a.get("bbox"))), anns[0])
            raise _coco_error(json_path, image_id, f"annotation {bad.get('id')} has bbox {bad.get('bbox')!r}; "
                                                   "expected [x, y, width, height], 4 finite numbers")
        invalid = ~np.isfinite(bbox).all(axis=1) | (bbox[:, 2] < 0) | (bbox[:, 3] < 0)
        if invalid.any():
            bad = anns[int(np.flatnonzero(invalid)[0])]
            raise _coco_error(json_path, image_id, f"annotation {bad.get('id')} has bbox {bad['bbox']!r}; expected "
                                                   "[x, y, width, height], 4 finite numbers with width, height ≥ 0")
        labels = [label_of.get(ann.get("category_id"), -1) for ann in anns]
        if -1 in labels:
            bad = anns[labels.index(-1)]
            raise _coco_error(json_path, image_id, f"annotation {bad.get('id')} has category_id "
                                                   f"{bad.get('category_id')!r}, not one of the categories {category_ids}")
        crowd = np.fromiter((bool(ann.get("iscrowd", 0)) for ann in anns), dtype=bool, count=len(anns))
        keep = (bbox[:, 2] > 0) & (bbox[:, 3] > 0)
        if skip_empty and not (keep & ~crowd).any():
            continue
        bbox = bbox[keep]
        paths.append(path)
        sizes.append(size)
        ids.append(int(image_id))
        all_boxes.append(np.concatenate([bbox[:, :2], bbox[:, :2] + bbox[:, 2:]], axis=1))
        all_labels.append(np.asarray(labels, dtype=np.int64)[keep])
        all_crowd.append(crowd[keep])
    return _records(paths, sizes, ids, all_boxes, all_labels, all_crowd), category_ids, class_names


class CocoDetection(DetectionDataset):
    """A COCO-format detection set: an image folder and its ``instances_*.json``.

    Args:
        images: the image folder (``coco/train2017``).
        annotations: the json (``coco/annotations/instances_train2017.json``).
        transform: see ``DetectionDataset``.
        skip_empty: drop images without a non-crowd box (training); evaluation keeps them.

    Attributes:
        category_ids: the COCO category id of every label (to map predictions back).
        class_names: the category names, in label order.
    """

    def __init__(self, images: str | Path, annotations: str | Path, transform: Optional[Callable] = None,
                 skip_empty: bool = False) -> None:
        images = require_path(images, "COCO image folder", COCO_LAYOUT, COCO_HOW_TO_GET)
        annotations = require_path(annotations, "COCO annotation file", COCO_LAYOUT, COCO_HOW_TO_GET)
        records, self.category_ids, class_names = parse_coco(annotations, images, skip_empty)
        super().__init__(records, class_names, transform)


def _voc_error(xml_path: Path, message: str) -> ValueError:
    return ValueError(f"'{xml_path}': {message} (expected Pascal VOC annotation xml: <annotation><size><width>"
                      "<height></size><object><name><difficult><bndbox><xmin><ymin><xmax><ymax></bndbox></object>)")


def _parse_voc_xml(xml_path: Path, label_of: dict[str, int]) -> tuple[tuple[int, int], np.ndarray, np.ndarray, np.ndarray]:
    """``((h, w), boxes xyxy 0-based, labels, difficult)`` of one VOC xml; ``(0, 0)`` when the size is missing."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as err:
        raise _voc_error(xml_path, f"cannot parse ({err})") from err
    try:
        size = (int(float(root.findtext("size/height", "0"))), int(float(root.findtext("size/width", "0"))))
    except ValueError as err:
        raise _voc_error(xml_path, f"bad <size> ({err})") from err
    boxes, labels, difficult = [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in label_of:
            raise _voc_error(xml_path, f"unknown class name {name!r}, not one of the 20 VOC classes")
        box = obj.find("bndbox")
        if box is None:
            raise _voc_error(xml_path, f"object {name!r} has no <bndbox>")
        try:
            coords = [float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError) as err:
            raise _voc_error(xml_path, f"object {name!r} has a bndbox without 4 numbers ({err})") from err
        if not all(math.isfinite(v) for v in coords) or coords[2] < coords[0] or coords[3] < coords[1]:
            raise _voc_error(xml_path, f"object {name!r} has an invalid bndbox {coords} (need xmin ≤ xmax, ymin ≤ ymax)")
        try:
            hard = int(float(obj.findtext("difficult") or 0))
        except ValueError as err:
            raise _voc_error(xml_path, f"object {name!r} has a non-numeric <difficult> ({err})") from err
        boxes.append([v - 1.0 for v in coords])  # 1-based pixel indices, as py-faster-rcnn
        labels.append(label_of[name])
        difficult.append(hard == 1)
    return (size, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
            np.asarray(difficult, dtype=bool))


def _split_set(name: str) -> tuple[str, str]:
    year, sep, split = name.partition("/")
    if not sep or not year.isdigit() or not split:
        raise ValueError(f"VOC sets are named '<year>/<split>', e.g. '2007/trainval', got {name!r}")
    return year, split


class VOCDetection(DetectionDataset):
    """Pascal VOC sets read from ``VOCdevkit``; several ``year/split`` sets are concatenated (07+12 trainval).

    Args:
        root: the ``VOCdevkit`` folder.
        sets: ``"<year>/<split>"`` names, e.g. ``["2007/trainval", "2012/trainval"]``.
        transform: see ``DetectionDataset``.

    ``difficult=1`` objects are kept with ``iscrowd`` set; ``image_id`` is the index in the concatenation;
    ``ids`` holds the ``(year, name)`` of every image.
    """

    def __init__(self, root: str | Path, sets: Sequence[str] | str = ("2007/trainval",),
                 transform: Optional[Callable] = None) -> None:
        root = require_path(root, "Pascal VOC (VOCdevkit)", VOC_LAYOUT, VOC_HOW_TO_GET)
        label_of = {name: label for label, name in enumerate(VOC_CLASSES)}
        self.ids: list[tuple[str, str]] = []
        paths, sizes, boxes, labels, crowd = [], [], [], [], []
        for set_name in [sets] if isinstance(sets, str) else sets:
            year, split = _split_set(set_name)
            base = root / f"VOC{year}"
            listing = require_path(base / "ImageSets" / "Main" / f"{split}.txt", f"VOC{year} split '{split}'",
                                   VOC_LAYOUT, VOC_HOW_TO_GET)
            for name in listing.read_text().split():
                xml_path = base / "Annotations" / f"{name}.xml"
                if not xml_path.is_file():
                    raise DatasetNotFoundError(f"'{xml_path}' (listed in '{listing}') is missing.\nExpected layout:\n"
                                               f"{VOC_LAYOUT}\nHow to get it: {VOC_HOW_TO_GET}")
                size, image_boxes, image_labels, difficult = _parse_voc_xml(xml_path, label_of)
                path = base / "JPEGImages" / f"{name}.jpg"
                if min(size) <= 0:  # a few files lack <size>: read the header only
                    try:
                        with Image.open(path) as img:
                            size = (img.height, img.width)
                    except OSError as err:
                        raise _voc_error(xml_path, f"no <size> and its image '{path}' cannot be opened ({err})") from err
                self.ids.append((year, name))
                paths.append(str(path))
                sizes.append(size)
                boxes.append(image_boxes)
                labels.append(image_labels)
                crowd.append(difficult)
        records = _records(paths, sizes, list(range(len(paths))), boxes, labels, crowd)
        super().__init__(records, VOC_CLASSES, transform)


# ---------------------------------------------------------------------------------------------------------------------
# Transforms and collation


def _shortest_side_size(height: int, width: int, min_size: int, max_size: Optional[int]) -> tuple[int, int]:
    """``(h, w)`` with the shorter side ``min_size`` and the longer one at most ``max_size`` (aspect kept, rounded)."""
    short, long = min(height, width), max(height, width)
    new_short, new_long = min_size, (2 * long * min_size + short) // (2 * short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = max(1, (2 * short * max_size + long) // (2 * long)), max_size
    return (new_short, new_long) if height <= width else (new_long, new_short)


class ResizeShortestSide(v2.Transform):
    """Resize so that the shorter side is ``min_size`` (drawn uniformly when a list) and the longer at most ``max_size``.

    ``RandomShortestSize`` / ``Resize(min_size, max_size=...)`` semantics, but exact (the shorter side is exactly
    ``min_size`` unless the cap applies; ``RandomShortestSize`` truncates ``h · r`` and can lose a pixel), allowing
    ``max_size == min_size``, and skipping the resize when the image already has the target size.
    """

    def __init__(self, min_size: int | Sequence[int], max_size: Optional[int] = None) -> None:
        super().__init__()
        self.min_size = [min_size] if isinstance(min_size, int) else [int(s) for s in min_size]
        if not self.min_size or min(self.min_size) < 1 or (max_size is not None and max_size < 1):
            raise ValueError(f"min_size must be positive int(s) and max_size positive, got {min_size}, {max_size}")
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        images = [x for x in flat_inputs if isinstance(x, (tv_tensors.Image, Image.Image)) or type(x) is torch.Tensor]
        if images:
            height, width = F.get_size(images[0])
        else:
            height, width = next(x.canvas_size for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes))
        choice = self.min_size[int(torch.randint(len(self.min_size), ()))] if len(self.min_size) > 1 else self.min_size[0]
        size = _shortest_side_size(height, width, choice, self.max_size)
        return {"size": None if size == (height, width) else list(size)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["size"] is None:
            return inpt
        return self._call_kernel(F.resize, inpt, size=params["size"], interpolation=v2.InterpolationMode.BILINEAR,
                                 antialias=True)


def _labels_and_crowd(inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``SanitizeBoundingBoxes``' labels getter: filter ``iscrowd`` alongside ``labels``."""
    target = inputs[1]
    return target["labels"], target["iscrowd"]


def detection_transform(train: bool, min_size: Optional[int | Sequence[int]] = None, max_size: Optional[int] = None,
                        flip_prob: float = 0.5) -> v2.Compose:
    """The ``(image, target)`` transform: resize (``min_size=None``: none), flip (training only), float in [0, 1],
    clamp the boxes to the image and drop degenerate ones with their labels and ``iscrowd``.

    Args:
        train: random horizontal flip with ``flip_prob``; ``min_size`` may be a list (multi-scale).
        min_size: shorter-side size (training: the sizes drawn from).
        max_size: cap of the longer side.
        flip_prob: horizontal-flip probability (training only).
    """
    steps: list[Callable] = []
    if min_size is not None:
        if not train and not isinstance(min_size, int):
            raise ValueError(f"evaluation resizes to one size, got min_size={min_size}")
        steps.append(ResizeShortestSide(min_size, max_size))
    if train and flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(flip_prob))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.ClampBoundingBoxes(),
              v2.SanitizeBoundingBoxes(labels_getter=_labels_and_crowd)]
    return v2.Compose(steps)


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]]
                      ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``(list of images, list of targets)``: images keep their own sizes (models pad them)."""
    return [image for image, _ in batch], [target for _, target in batch]


# ---------------------------------------------------------------------------------------------------------------------
# Aspect-ratio grouped, DDP-sharded batches


class AspectRatioBatchSampler(EpochBatchSampler):
    """Batches that hold only landscape (``w/h ≥ 1``) or only portrait images, sharded across DDP ranks.

    Like torchvision's ``GroupedBatchSampler``: the epoch's order is a permutation of the data (seeded by
    ``(seed, epoch)``, identity without ``shuffle``); each orientation's images, in that order, are cut into batches
    of ``batch_size`` (the last one of each orientation may be smaller), and the batches are ordered by where their
    last image falls. Everything is tensor ops once per epoch; iterating only slices.

    Under DDP every rank builds the same batch list and rank ``r`` takes batches ``r, r + w, ...``. Every rank gets
    the same number of batches (``__len__``, as DDP needs): with ``drop_last`` the partial and tail batches are
    dropped; without it the largest batches are halved until the count divides by the world size, so the ranks'
    shares are disjoint and together cover the data once (only when there are fewer images than needed batches,
    e.g. ``batch_size=1`` with a world size not dividing the data, are a few first batches repeated).

    ``set_epoch`` (called by Lightning through ``sampler``, see ``EpochBatchSampler``) reshuffles deterministically.

    Args:
        aspect_ratios: ``w / h`` of every image.
        batch_size: images per batch on each rank.
        shuffle: shuffle every epoch.
        seed: with the epoch, fixes the order; the same on every rank.
        drop_last: drop the incomplete batches.
        rank, world_size: this process's shard (default: from ``torch.distributed``, else a single process).
    """

    def __init__(self, aspect_ratios: torch.Tensor | Sequence[float], batch_size: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.landscape = torch.as_tensor(aspect_ratios, dtype=torch.float64) >= 1
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        self.epoch = 0
        if len(self) == 0:
            raise ValueError(f"{len(self.landscape)} images give no batch of {batch_size} to each of "
                             f"{self.world_size} ranks (drop_last={drop_last})")

    def _num_batches(self) -> int:
        counts = (int(self.landscape.sum()), int((~self.landscape).sum()))
        if self.drop_last:
            return sum(c // self.batch_size for c in counts)
        return sum(-(-c // self.batch_size) for c in counts)

    def __len__(self) -> int:
        if self.drop_last:
            return self._num_batches() // self.world_size
        return -(-self._num_batches() // self.world_size)

    def epoch_batches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(items, sizes)`` of the whole epoch (all ranks): batch ``b`` is the next ``sizes[b]`` entries of ``items``."""
        n, bs = len(self.landscape), self.batch_size
        order = torch.randperm(n, generator=seeded_generator(self.seed, self.epoch)) if self.shuffle else torch.arange(n)
        land = self.landscape[order].long()
        position = torch.where(land.bool(), torch.cumsum(land, 0), torch.cumsum(1 - land, 0)) - 1
        key = (position // bs) * 2 + land  # one key per (orientation, batch)
        if self.drop_last:
            full = torch.tensor([int((1 - land).sum()) // bs, int(land.sum()) // bs])
            keep = position // bs < full[land]
            order, key = order[keep], key[keep]
        # A batch is ordered by its last image's position; its items stay in epoch order.
        completion = torch.full((int(key.max()) + 1 if len(key) else 0,), -1, dtype=torch.int64)
        completion.scatter_reduce_(0, key, torch.arange(len(key)), reduce="amax")
        items = order[torch.argsort(completion[key], stable=True)]
        present = torch.nonzero(completion >= 0).flatten()
        present = present[torch.argsort(completion[present])]
        sizes = torch.bincount(key, minlength=len(completion))[present]
        world = self.world_size
        if self.drop_last:
            sizes = sizes[: len(sizes) // world * world]
            items = items[: int(sizes.sum())]
        else:
            for _ in range((-len(sizes)) % world):  # halve the largest batch (≤ world - 1 times)
                largest = int(torch.argmax(sizes))
                if sizes[largest] < 2:  # fewer images than batches needed: repeat the first batches
                    extra = (-len(sizes)) % world
                    items = torch.cat([items, items[: int(sizes[:extra].sum())]])
                    sizes = torch.cat([sizes, sizes[:extra]])
                    break
                half = int(sizes[largest]) // 2
                sizes = torch.cat([sizes[:largest], torch.tensor([int(sizes[largest]) - half, half]), sizes[largest + 1:]])
        return items, sizes

    def __iter__(self) -> Iterator[list[int]]:
        items, sizes = self.epoch_batches()
        items_list, starts = items.tolist(), (torch.cumsum(sizes, 0) - sizes).tolist()
        sizes_list = sizes.tolist()
        for b in range(self.rank, len(sizes_list), self.world_size):
            yield items_list[starts[b]: starts[b] + sizes_list[b]]


# ---------------------------------------------------------------------------------------------------------------------
# DataModules


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
    """

    def __init__(self, train_min_size: int | list[int], min_size: int, max_size: int, flip_prob: float,
                 group_aspect_ratio: bool, batch_size: int, eval_batch_size: Optional[int], num_workers: int,
                 pin_memory: bool, seed: int) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        self.train_min_size = train_min_size if isinstance(train_min_size, int) else list(train_min_size)
        self.min_size, self.max_size, self.flip_prob = min_size, max_size, flip_prob
        self.group_aspect_ratio, self.seed = group_aspect_ratio, seed

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} must define class_names")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train_transform(self) -> v2.Compose:
        return detection_transform(True, self.train_min_size, self.max_size, self.flip_prob)

    def eval_transform(self) -> v2.Compose:
        return detection_transform(False, self.min_size, self.max_size)

    def _build(self, split: str, transform: Callable) -> DetectionDataset:
        raise NotImplementedError(f"{type(self).__name__} must implement _build(split, transform)")

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._build("train", self.train_transform())
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._build("val", self.eval_transform())
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._build("test", self.eval_transform())

    def _require(self, dataset: Optional[Dataset], stage: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup({stage!r}) before this dataloader")
        return dataset

    def train_dataloader(self) -> DataLoader:
        self._refuse_lightning_sampler()
        dataset = self._require(self.train_set, "fit")
        rank, world = self._world()
        ratios = dataset.aspect_ratios if self.group_aspect_ratio else torch.ones(len(dataset))
        sampler = AspectRatioBatchSampler(ratios, self.batch_size, shuffle=True, seed=self.seed, drop_last=False,
                                          rank=rank, world_size=world)
        trainer = getattr(self, "trainer", None)
        sampler.set_epoch(trainer.current_epoch if trainer is not None else 0)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=detection_collate, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def _eval_loader(self, dataset: Optional[Dataset], stage: str) -> DataLoader:
        """Rank ``r`` of ``w`` evaluates images ``r, r + w, ...`` (every image once, no padding; ``image_id``
        identifies them for ``DetectionMetrics``)."""
        self._refuse_lightning_sampler()
        return self._strided_eval_loader(self._require(dataset, stage), collate_fn=detection_collate)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set, "validate")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set, "test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set, "predict")


class CocoDetectionDataModule(DetectionDataModule):
    """COCO (or any COCO-format set): image folders and ``instances_*.json`` under ``root``.

    Training skips images without a non-crowd box; validation and test keep every image. ``category_ids`` maps
    labels back to COCO category ids (for COCO-style result files).

    Args:
        root: the dataset folder (``data/coco``).
        train_images, train_annotations, val_images, val_annotations: paths relative to ``root``.
        test_images, test_annotations: default: the validation ones.
        (others: see ``DetectionDataModule``)
    """

    def __init__(
        self,
        root: str = "data/coco",
        train_images: str = "train2017",
        train_annotations: str = "annotations/instances_train2017.json",
        val_images: str = "val2017",
        val_annotations: str = "annotations/instances_val2017.json",
        test_images: Optional[str] = None,
        test_annotations: Optional[str] = None,
        train_min_size: int | list[int] = 800,
        min_size: int = 800,
        max_size: int = 1333,
        flip_prob: float = 0.5,
        group_aspect_ratio: bool = True,
        batch_size: int = 2,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(train_min_size, min_size, max_size, flip_prob, group_aspect_ratio, batch_size,
                         eval_batch_size, num_workers, pin_memory, seed)
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
        (others: see ``DetectionDataModule``; 600 / 1000 as in Faster R-CNN's VOC setting)
    """

    def __init__(
        self,
        root: str = "data/VOCdevkit",
        train_sets: list[str] = ["2007/trainval", "2012/trainval"],  # noqa: B006 (copied, never mutated)
        val_set: str = "2007/test",
        test_set: str = "2007/test",
        train_min_size: int | list[int] = 600,
        min_size: int = 600,
        max_size: int = 1000,
        flip_prob: float = 0.5,
        group_aspect_ratio: bool = True,
        batch_size: int = 2,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        download: bool = False,
    ) -> None:
        super().__init__(train_min_size, min_size, max_size, flip_prob, group_aspect_ratio, batch_size,
                         eval_batch_size, num_workers, pin_memory, seed)
        self.root = Path(root)
        self.download = download
        self.sets = {"train": list(train_sets), "val": [val_set], "test": [test_set]}
        for names in self.sets.values():
            for name in names:
                _split_set(name)

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
            year, split = _split_set(name)
            if not (self.root / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt").exists():
                torchvision.datasets.VOCDetection(str(self.root.parent), year=year, image_set=split, download=True)

    def _build(self, split: str, transform: Callable) -> VOCDetection:
        return VOCDetection(self.root, self.sets[split], transform)


# ---------------------------------------------------------------------------------------------------------------------
# The embedded default: digits on canvas

_CANVAS_MARKER = "digit_canvas.json"
_SPLIT_POOLS = {"train": (0, 1400), "val": (1400, 1600), "test": (1600, None)}  # sklearn digit indices: writers


def resize_digit(digit: np.ndarray, size: int) -> np.ndarray:
    """An 8×8 digit in [0, 1] resized (bilinear) to ``size × size``, float32 in [0, 1]."""
    resized = Image.fromarray(np.ascontiguousarray(digit, dtype=np.float32)).resize((size, size), Image.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area, areas = (box[2] - box[0]) * (box[3] - box[1]), (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def _draw_canvas(rng: np.random.Generator, digits: np.ndarray, pool: np.ndarray, canvas_size: int, min_digit: int,
                 max_digit: int, max_digits: int, noise: float) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """One canvas (uint8) and its ``(x, y, size, digit index)`` pastes."""
    canvas = rng.uniform(0.0, noise, (canvas_size, canvas_size)).astype(np.float32)
    placed: list[tuple[int, int, int, int]] = []
    boxes = np.zeros((0, 4))
    for _ in range(int(rng.integers(1, max_digits + 1))):
        for _attempt in range(100):
            size = int(rng.integers(min_digit, max_digit + 1))
            x, y = (int(v) for v in rng.integers(0, canvas_size - size + 1, 2))
            box = np.array([x, y, x + size, y + size], dtype=np.float64)
            if len(boxes) == 0 or _iou(box, boxes).max() < 0.05:
                break
        else:
            break  # this canvas is full enough
        index = int(pool[rng.integers(len(pool))])
        region = canvas[y:y + size, x:x + size]
        np.maximum(region, resize_digit(digits[index], size), out=region)
        placed.append((x, y, size, index))
        boxes = np.concatenate([boxes, box[None]])
    return (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8), placed


def _canvas_is_current(root: Path, params: dict) -> bool:
    try:
        return (root / "annotations").is_dir() and json.loads((root / _CANVAS_MARKER).read_text()) == params
    except (OSError, json.JSONDecodeError):
        return False


def write_digit_canvas(root: str | Path, seed: int = 0, canvas_size: int = 128, num_train: int = 1000,
                       num_val: int = 200, num_test: int = 200, min_digit: int = 16, max_digit: int = 40,
                       max_digits: int = 4, noise: float = 0.3) -> Path:
    """Write the digits-on-canvas detection set under ``root`` in COCO format (once per parameter set); return ``root``.

    Each square grayscale canvas is uniform noise in ``[0, noise)`` with 1..``max_digits`` of scikit-learn's 8×8
    digits (0..16 scaled to [0, 1]) resized (bilinear) to random squares of ``min_digit``..``max_digit`` px and
    max-blended in, placed by rejection sampling so that pasted squares overlap with IoU < 0.05. The box is the
    pasted square, the label the digit. Train canvases draw from digits ``[:1400]``, val from ``[1400:1600]`` and
    test from ``[1600:]``: the evaluation digits come from writers never seen in training. Canvas ``i`` of a split
    depends only on ``(seed, split, i)``.

    Layout (real COCO format; annotations carry the sklearn ``digit_index`` as an extra field):

        <root>/{train,val,test}/000000.png ...
        <root>/annotations/instances_{train,val,test}.json    category ids 1..10 named "0".."9"
        <root>/digit_canvas.json                               the generation parameters

    The set is written into a temporary sibling folder and moved into place with ``os.replace``, so concurrent
    writers never expose a half-written set: if another process installed the same set first, its copy is used. A
    set with other parameters is replaced. ``root`` must not hold anything else.

    Raises:
        ValueError: inconsistent sizes, or ``root`` is a non-empty folder that is not a digit-canvas set.
    """
    if not (1 <= min_digit <= max_digit <= canvas_size) or max_digits < 1 or not 0 < noise <= 1 or seed < 0:
        raise ValueError(f"write_digit_canvas: need 1 ≤ min_digit ≤ max_digit ≤ canvas_size, max_digits ≥ 1, "
                         f"0 < noise ≤ 1, seed ≥ 0; got {min_digit}, {max_digit}, {canvas_size}, {max_digits}, "
                         f"{noise}, {seed}")
    if min(num_train, num_val, num_test) < 0:
        raise ValueError(f"write_digit_canvas: negative split size ({num_train}, {num_val}, {num_test})")
    root = Path(root)
    params = dict(version=1, seed=seed, canvas_size=canvas_size, num_train=num_train, num_val=num_val,
                  num_test=num_test, min_digit=min_digit, max_digit=max_digit, max_digits=max_digits, noise=noise)
    if _canvas_is_current(root, params):
        return root
    if root.is_dir() and any(root.iterdir()) and not (root / _CANVAS_MARKER).exists():
        raise ValueError(f"'{root}' exists and is not a digit-canvas set (no {_CANVAS_MARKER}); refusing to replace "
                         "it: choose an empty or new root")
    from sklearn.datasets import load_digits  # the bundled copy: no download

    digits = load_digits()
    images, targets = digits.images.astype(np.float32) / 16.0, digits.target
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".partial", dir=root.parent))
    try:
        (staging / "annotations").mkdir()
        categories = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
        for code, (split, count) in enumerate((("train", num_train), ("val", num_val), ("test", num_test))):
            (staging / split).mkdir()
            lo, hi = _SPLIT_POOLS[split]
            pool = np.arange(len(images))[lo:hi]
            entries, annotations = [], []
            for i in range(count):
                rng = np.random.default_rng([seed, code, i])
                canvas, placed = _draw_canvas(rng, images, pool, canvas_size, min_digit, max_digit, max_digits, noise)
                name = f"{i:06d}.png"
                Image.fromarray(canvas).save(staging / split / name, compress_level=1)
                entries.append({"id": i, "file_name": name, "width": canvas_size, "height": canvas_size})
                for x, y, size, index in placed:
                    annotations.append({"id": len(annotations) + 1, "image_id": i,
                                        "category_id": int(targets[index]) + 1, "bbox": [x, y, size, size],
                                        "area": size * size, "iscrowd": 0, "digit_index": index})
            coco = {"info": {"description": "digits on canvas (datamodules.detection.write_digit_canvas)"},
                    "images": entries, "annotations": annotations, "categories": categories}
            (staging / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        (staging / _CANVAS_MARKER).write_text(json.dumps(params, indent=1))
        for _ in range(10):
            if _canvas_is_current(root, params):
                break  # another process finished first: use theirs
            try:
                os.replace(staging, root)  # atomic; succeeds when root is absent or an empty folder
                break
            except OSError:
                # root holds an outdated set: move it aside (atomically), then retry
                if _canvas_is_current(root, params):
                    break
                aside = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
                try:
                    os.replace(root, aside)
                except FileNotFoundError:
                    pass
                shutil.rmtree(aside, ignore_errors=True)
        else:
            raise RuntimeError(f"could not install the digit-canvas set at '{root}' (concurrent writers?)")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


class DigitCanvasDataModule(CocoDetectionDataModule):
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
        seed: with the epoch, fixes the training order.
        (others: see ``DetectionDataModule``)
    """

    def __init__(
        self,
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
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(root, "train", "annotations/instances_train.json", "val", "annotations/instances_val.json",
                         "test", "annotations/instances_test.json",
                         canvas_size if train_min_size is None else train_min_size,
                         min_size or canvas_size, max_size or canvas_size, flip_prob, group_aspect_ratio, batch_size,
                         eval_batch_size, num_workers, pin_memory, seed)
        self.generation = dict(seed=generator_seed, canvas_size=canvas_size, num_train=num_train, num_val=num_val,
                               num_test=num_test, min_digit=min_digit, max_digit=max_digit, max_digits=max_digits,
                               noise=noise)

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
