"""COCO object-detection json (cocodataset.org), read with the standard library.

    <root>/train2017/000000000009.jpg                    images
    <root>/annotations/instances_{train,val}2017.json    boxes

Boxes are ``[x, y, width, height]``; the sparse category ids (1..90) become labels 0..79 in sorted-id order
(``category_ids`` maps back). Zero-area boxes (present in real COCO) are dropped; ``iscrowd=1`` boxes are kept with
the flag set (not trained on, ignored by the evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from datamodules.base import require_path
from datamodules.detection.records import DetectionDataset, DetectionRecords, make_records

__all__ = ["COCO_LAYOUT", "COCO_HOW_TO_GET", "parse_coco", "CocoDetection"]

COCO_LAYOUT = """\
  coco/train2017/000000000009.jpg ...              training images
  coco/val2017/000000000139.jpg ...                validation images
  coco/annotations/instances_train2017.json        training boxes (COCO object-detection json)
  coco/annotations/instances_val2017.json          validation boxes"""
COCO_HOW_TO_GET = ("https://cocodataset.org/#download: '2017 Train images', '2017 Val images' and '2017 Train/Val "
                   "annotations', unzipped into the root")



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
        ValueError: naming the json file and the keys it lacks, when it is not a dict with ``images``,
            ``annotations`` and ``categories`` (an image-info json has no annotations);
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
    required = ("images", "annotations", "categories")
    missing = [key for key in required if key not in data] if isinstance(data, dict) else list(required)
    if missing:
        # an image-info json (e.g. image_info_test-dev2017.json) has no 'annotations': nothing to train or score on
        found = f"it lacks {missing}" if isinstance(data, dict) else f"it holds a {type(data).__name__}"
        raise ValueError(f"'{json_path}' is not a COCO detection file: {found} (a COCO object-detection json is a "
                         f"dict with 'images', 'annotations' and 'categories'); expected\n{COCO_LAYOUT}")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    category_ids = [int(c["id"]) for c in categories]
    class_names = [str(c.get("name", c["id"])) for c in categories]
    label_of = {cid: label for label, cid in enumerate(category_ids)}

    image_entries = sorted(data["images"], key=lambda entry: entry["id"])
    by_image: dict[Any, list[dict]] = {entry["id"]: [] for entry in image_entries}
    for ann in data["annotations"]:
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
    return make_records(paths, sizes, ids, all_boxes, all_labels, all_crowd), category_ids, class_names


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
