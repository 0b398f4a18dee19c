"""``zoo predict`` for the detectors: a COCO results file and drawn images.

``DetectionPredictionWriter`` writes, under ``<run folder>/predictions/``:

* ``results.json``: COCO's results format, a list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``,
  one entry per detection, boxes in the pixels of the original image file, ``category_id`` the dataset's own id
  (COCO's sparse 1..90; the digit canvases 1..10; VOC 1..20 in ``VOC_CLASSES`` order). On the test split it loads
  with pycocotools' / faster_coco_eval's ``COCO(annotations).loadRes("results.json")`` against the split's
  annotation file and gives the mAP of ``zoo test``. On a folder of one's own images (``predict_dir``) the images
  have no ids: each entry has ``"file_name"`` (the path relative to the folder) instead of ``"image_id"``;
* ``categories.json``: ``[{"id", "name"}]``, the category ids and class names the results use;
* ``images/<name>.png``: the first ``num_drawn`` images of the set (by their index in it) with the detections
  scoring at least ``min_score`` drawn on the original image, labelled with class name and score; ``<name>`` is the
  image file's name without its ending (for a folder: its path inside the folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from PIL import Image
from torchvision.ops import box_convert
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes

from zoo.predict import PredictionWriter

__all__ = ["DetectionPredictionWriter"]


class DetectionPredictionWriter(PredictionWriter):
    """COCO ``results.json`` (+ ``categories.json``) of every image and drawn detections of the first ones.

    Rows are one per image: ``(sort key, [COCO result dicts])``; ``finish`` orders them by image id (test split) or
    file name (``predict_dir``) and writes them out, keeping each image's detections in the model's order.

    Args:
        num_drawn: how many images (the first ones of the set) are drawn into ``images/``; 0: none.
        min_score: the detections drawn are those scoring at least this (``results.json`` has all of them).
        output_dir: where the files go; ``None``: ``PredictionWriter.folder`` (the run folder's ``predictions/``).
    """

    def __init__(self, num_drawn: int = 16, min_score: float = 0.3, output_dir: Optional[str] = None) -> None:
        super().__init__(output_dir)
        self.num_drawn, self.min_score = num_drawn, min_score
        self._names: list[str] = []
        self._category_ids = torch.zeros(0, dtype=torch.long)
        self._test_files: dict[int, tuple[int, str]] = {}
        self._predict_dir: Optional[Path] = None

    def on_predict_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        super().on_predict_start(trainer, pl_module)
        names, ids = pl_module.class_names_and_ids()
        self._names, self._category_ids = names, torch.tensor(ids, dtype=torch.long)
        datamodule = trainer.datamodule
        predict_dir = getattr(datamodule, "predict_dir", None)
        self._predict_dir = Path(predict_dir).expanduser().resolve() if predict_dir is not None else None
        # Test-split batches carry image ids only; the split's records give each id its index and file (to draw).
        records = getattr(getattr(datamodule, "test_set", None), "records", None)
        self._test_files = {} if records is None else {
            int(image_id): (index, path) for index, (image_id, path) in enumerate(zip(records.image_ids, records.paths))}

    def _file_name(self, path: str) -> str:
        """A ``predict_dir`` file's path inside the folder (posix), as ``results.json`` names it."""
        resolved = Path(path).expanduser().resolve()
        if self._predict_dir is not None and resolved.is_relative_to(self._predict_dir):
            return resolved.relative_to(self._predict_dir).as_posix()
        return str(path)

    def rows(self, outputs: Any, batch: Any, dataloader_idx: int, folder: Path, trainer: "L.Trainer",
             pl_module: "L.LightningModule") -> list[tuple[Any, list[dict]]]:
        rows = []
        for det in outputs:
            boxes = det["boxes"].detach().float().cpu()
            scores = det["scores"].detach().float().cpu()
            labels = det["labels"].detach().long().cpu()
            # COCO's [x, y, w, h] the way torchmetrics converts before its COCOeval: the same floats, the same mAP.
            xywh = box_convert(boxes, "xyxy", "xywh").tolist()
            categories = self._category_ids[labels].tolist() if len(self._category_ids) else (labels + 1).tolist()
            if "path" in det:
                key, value = "file_name", self._file_name(det["path"])
                index, path, name = int(det["index"]), det["path"], Path(value).with_suffix("").as_posix()
            else:
                key, value = "image_id", int(det["image_id"])
                index, path = self._test_files.get(value, (None, None))
                name = Path(path).stem if path is not None else str(value)
            results = [{key: value, "category_id": category, "bbox": box, "score": score}
                       for category, box, score in zip(categories, xywh, scores.tolist())]
            rows.append((value, results))
            if path is not None and index is not None and index < self.num_drawn:
                self._draw(folder / "images" / f"{name}.png", path, boxes, scores, labels)
        return rows

    def _draw(self, out: Path, path: str, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """The image file with its detections ≥ ``min_score`` in red, each labelled ``<class name> <score>``."""
        with Image.open(path) as image:  # the file as it is, for drawing (models never import the datamodules)
            canvas = pil_to_tensor(image.convert("RGB"))
        keep = scores >= self.min_score
        if keep.any():
            names = [self._names[int(c)] if int(c) < len(self._names) else str(int(c)) for c in labels[keep]]
            captions = [f"{name} {float(s):.2f}" for name, s in zip(names, scores[keep])]
            width = max(1, round(min(canvas.shape[-2:]) / 200))
            canvas = draw_bounding_boxes(canvas, boxes[keep], labels=captions, colors="red", width=width)
        out.parent.mkdir(parents=True, exist_ok=True)
        to_pil_image(canvas).save(out)

    def finish(self, rows: list[tuple[Any, list[dict]]], folder: Path, trainer: "L.Trainer",
               pl_module: "L.LightningModule") -> list[Path]:
        rows = sorted(rows, key=lambda row: row[0])  # stable: each image keeps its detections' order
        results = [result for _, image_results in rows for result in image_results]
        written = [folder / "results.json", folder / "categories.json"]
        written[0].write_text(json.dumps(results))
        categories = [{"id": int(i), "name": name} for i, name in zip(self._category_ids.tolist(), self._names)]
        written[1].write_text(json.dumps(categories, indent=1))
        if (folder / "images").is_dir():
            written.append(folder / "images")
        return written
