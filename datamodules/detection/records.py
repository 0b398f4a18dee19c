"""The parsed annotations of a detection set and the dataset that serves them as ``(image, target)``.

``DetectionRecords`` holds a whole split compactly (one array per field); ``DetectionDataset`` decodes an image,
applies the ``(image, target)`` transform and returns the target dict documented in ``datamodules.detection``.
The format readers (``coco.py``, ``voc.py``) produce the records.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from datamodules.base import read_image
from datamodules.detection.transforms import detection_transform

__all__ = ["DetectionRecords", "make_records", "DetectionDataset"]


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


def make_records(paths: list[str], sizes: list[tuple[int, int]], image_ids: list[int], boxes: list[np.ndarray],
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
