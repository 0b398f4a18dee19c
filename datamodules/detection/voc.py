"""Pascal VOC (host.robots.ox.ac.uk/pascal/VOC) read from ``VOCdevkit``, several ``year/split`` sets concatenated.

    <root>/VOC2007/Annotations/000005.xml          one xml per image
    <root>/VOC2007/JPEGImages/000005.jpg           the images
    <root>/VOC2007/ImageSets/Main/{trainval,test}.txt

Boxes are 1-based pixel indices; they become ``x1 = xmin - 1 ... x2 = xmax - 1`` as in py-faster-rcnn, and the classes
are the 20 standard ones in the standard order (``VOC_CLASSES``); ``difficult=1`` objects are kept with ``iscrowd``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from datamodules.base import DatasetNotFoundError, require_path
from datamodules.detection.records import DetectionDataset, make_records

__all__ = ["VOC_CLASSES", "VOC_LAYOUT", "VOC_HOW_TO_GET", "parse_voc_set_name", "VOCDetection"]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

VOC_LAYOUT = """\
  VOCdevkit/VOC2007/Annotations/000005.xml ...     one xml per image (size, objects with name, difficult, bndbox)
  VOCdevkit/VOC2007/JPEGImages/000005.jpg ...      the images
  VOCdevkit/VOC2007/ImageSets/Main/trainval.txt    image ids of a split, one per line (also test.txt)
  VOCdevkit/VOC2012/...                            the same for 2012 (trainval only)"""
VOC_HOW_TO_GET = ("http://host.robots.ox.ac.uk/pascal/VOC/: VOCtrainval_06-Nov-2007.tar, VOCtest_06-Nov-2007.tar and "
                  "VOCtrainval_11-May-2012.tar, all extracted into the same VOCdevkit/")


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


def parse_voc_set_name(name: str) -> tuple[str, str]:
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
            year, split = parse_voc_set_name(set_name)
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
        records = make_records(paths, sizes, list(range(len(paths))), boxes, labels, crowd)
        super().__init__(records, VOC_CLASSES, transform)
