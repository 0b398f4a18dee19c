"""Detection metrics: COCO mAP (torchmetrics ``MeanAveragePrecision``, faster_coco_eval backend) and Pascal VOC07
11-point AP@0.5, from one set of states that is exact under DDP.

torchmetrics' ``MeanAveragePrecision`` keeps one tensor per image and gathers them one by one, which needs the same
number of images on every rank; the zoo's evaluation loaders shard without padding, so ranks can differ by one.
``DetectionMetrics`` therefore stores flat rows tagged with the image id (concatenated and gathered whatever their
lengths), regroups them by image at ``compute`` and runs the COCO evaluation there, once, on every rank.

Per-class AP, AP50 and AP75 (``per_class=True``, used at test) are read off the same evaluation's precision array
(``per_class_average_precision``, from torchmetrics' ``extended_summary``); the only cost is the copy of that summary's
IoU and precision arrays (1.8 → 3.2 s on a synthetic 500-image, 80-class set). torchmetrics' ``class_metrics=True``
re-runs the evaluation once per class instead (3.7 s there) and gives no per-class AP50/AP75.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_iou

__all__ = ["voc07_average_precision", "per_class_average_precision", "DetectionMetrics"]


def voc07_average_precision(scores: np.ndarray, true_positive: np.ndarray, num_positives: int) -> float:
    """VOC2007 11-point interpolated AP of one class: the mean over recall ``t ∈ {0, 0.1, …, 1}`` of the best
    precision at recall ≥ t. ``scores`` and ``true_positive`` (bool) are per counted detection (ignored ones
    removed); ``num_positives`` counts the non-difficult GT boxes."""
    if num_positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = true_positive[order].astype(np.float64)
    tp, fp = np.cumsum(hits), np.cumsum(1 - hits)
    recall = tp / num_positives
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.arange(0, 1.1, 0.1)]))


def _voc07_match(pred: dict, target: dict, label: int, iou_threshold: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Greedy VOC matching of one image and class in score order: a detection is a true positive when its best
    IoU ≥ threshold is with a not yet matched non-difficult GT, ignored when that GT is difficult, else false."""
    keep_p, keep_t = pred["labels"] == label, target["labels"] == label
    boxes, scores = pred["boxes"][keep_p], pred["scores"][keep_p]
    gt, difficult = target["boxes"][keep_t], target["iscrowd"][keep_t]
    order = scores.argsort(descending=True)
    boxes, scores = boxes[order], scores[order]
    true_positive = np.zeros(len(boxes), dtype=bool)
    counted = np.ones(len(boxes), dtype=bool)
    if len(gt) and len(boxes):
        ious = box_iou(boxes, gt)
        best_iou, best_gt = ious.max(dim=1)
        taken = np.zeros(len(gt), dtype=bool)
        # The VOC devkit's greedy assignment is sequential in score order; this loop runs at evaluation only.
        for i, (iou, g) in enumerate(zip(best_iou.tolist(), best_gt.tolist())):
            if iou < iou_threshold:
                continue
            if difficult[g]:
                counted[i] = False
            elif not taken[g]:
                true_positive[i], taken[g] = True, True
    return scores.numpy()[counted], true_positive[counted], counted, int((~difficult).sum())


# pycocotools' Params (np.linspace in float64). torchmetrics' defaults come from a float32 torch.linspace, so a recall of
# exactly k/100 can fall on the next recall point and move mAP by up to 0.002.
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True).tolist()
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True).tolist()


def per_class_average_precision(precision: np.ndarray, iou_thresholds: list[float]) -> np.ndarray:
    """``(K, 3)``: AP, AP50 and AP75 of every class from COCOeval's accumulated ``precision`` array ``(T, R, K, A, M)``
    (the area range "all" and the largest detection budget are taken), NaN for a class without (non-crowd) ground
    truth, whose entries COCOeval leaves at -1; a column is NaN when its IoU threshold is not evaluated.

    COCOeval's mAP is the mean of the entries above -1 over IoUs, recall points and classes; a class with ground
    truth fills all ``T · R`` of its entries, so the mAP is exactly the mean of these APs over the non-NaN classes.
    """
    scores = np.asarray(precision, dtype=np.float64)[:, :, :, 0, -1]  # (T, R, K)
    valid = scores > -1

    def mean_over(rows: np.ndarray) -> np.ndarray:
        count = valid[rows].sum(axis=(0, 1))
        total = np.where(valid[rows], scores[rows], 0.0).sum(axis=(0, 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    columns = [mean_over(np.arange(len(thresholds)))]
    for iou in (0.5, 0.75):
        at = np.flatnonzero(np.isclose(thresholds, iou))
        columns.append(mean_over(at[:1]) if len(at) else np.full(scores.shape[2], np.nan))
    return np.stack(columns, axis=1)


class DetectionMetrics(Metric):
    """COCO box mAP (``map``, ``map_50``, ``map_75``, ``map_small|medium|large``, ``mar_100``) and, with
    ``voc07=True``, ``voc07_map50``: VOC2007's 11-point AP at IoU 0.5, difficult objects (``iscrowd``) ignored.

    ``update(preds, targets)`` takes torchmetrics' format (lists of dicts with ``boxes`` xyxy, ``scores``,
    ``labels``; targets with ``boxes``, ``labels``, optional ``iscrowd`` and ``image_id``, which must be unique
    across the evaluation set).

    With ``per_class=True``, ``compute`` also returns ``per_class``: a ``(K, 5)`` tensor with one row
    ``[label, AP, AP50, AP75, ground-truth boxes]`` per label seen in the predictions or the ground truth (sorted),
    AP columns NaN for a label without non-crowd ground truth (COCOeval leaves it out of the mAP), boxes counted
    without crowd / difficult ones.
    """

    full_state_update = False

    def __init__(self, voc07: bool = False, per_class: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.voc07, self.per_class = voc07, per_class
        self.add_state("detections", default=[], dist_reduce_fx="cat")  # rows: image, label, score, x1, y1, x2, y2
        self.add_state("groundtruths", default=[], dist_reduce_fx="cat")  # rows: image, label, crowd, x1, y1, x2, y2
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")

    def update(self, preds: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]) -> None:
        for pred, target in zip(preds, targets):
            image = torch.as_tensor(target["image_id"], dtype=torch.float64, device=self.device).reshape(1)
            crowd = target.get("iscrowd", torch.zeros(len(target["labels"]), dtype=torch.bool))
            self.detections.append(torch.cat([image.expand(len(pred["scores"]), 1), pred["labels"][:, None].double(),
                                              pred["scores"][:, None].double(), pred["boxes"].double()], dim=1))
            self.groundtruths.append(torch.cat([image.expand(len(target["labels"]), 1),
                                                target["labels"][:, None].double(), crowd[:, None].double(),
                                                target["boxes"].double()], dim=1))
            self.image_ids.append(image)

    def _per_image(self) -> tuple[list[dict], list[dict]]:
        def as_rows(state: list | torch.Tensor) -> torch.Tensor:
            if isinstance(state, list):
                return torch.cat(state) if state else torch.zeros(0, 7, dtype=torch.float64)
            return state.reshape(-1, 7)

        detections, groundtruths = as_rows(self.detections).cpu(), as_rows(self.groundtruths).cpu()
        ids = self.image_ids
        ids = (torch.cat(ids) if isinstance(ids, list) and ids else torch.as_tensor(ids, dtype=torch.float64)).cpu()
        images = ids.reshape(-1).unique()
        if len(images) != len(ids.reshape(-1)):
            raise ValueError("DetectionMetrics: an image id was evaluated twice (ids must be unique across the set)")

        def split(rows: torch.Tensor) -> list[torch.Tensor]:
            rows = rows[rows[:, 0].argsort(stable=True)]
            counts = torch.zeros(len(images), dtype=torch.long)
            image_index = torch.searchsorted(images, rows[:, 0].contiguous())
            counts.index_add_(0, image_index, torch.ones(len(rows), dtype=torch.long))
            return list(rows.split(counts.tolist()))

        preds = [dict(boxes=d[:, 3:].float(), scores=d[:, 2].float(), labels=d[:, 1].long()) for d in split(detections)]
        targets = [dict(boxes=g[:, 3:].float(), labels=g[:, 1].long(), iscrowd=g[:, 2].bool())
                   for g in split(groundtruths)]
        return preds, targets

    def compute(self) -> dict[str, torch.Tensor]:
        preds, targets = self._per_image()
        coco = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval", sync_on_compute=False,
                                    iou_thresholds=COCO_IOU_THRESHOLDS, rec_thresholds=COCO_RECALL_THRESHOLDS,
                                    extended_summary=self.per_class)
        coco.update(preds, [dict(boxes=t["boxes"], labels=t["labels"], iscrowd=t["iscrowd"].long()) for t in targets])
        summary = coco.compute()
        keys = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")
        results = {k: summary[k].float() for k in keys}
        if self.per_class:
            results["per_class"] = self._per_class_rows(summary, targets)
        if self.voc07:
            results["voc07_map50"] = torch.tensor(self.voc07_map(preds, targets))
        return {k: v.to(self.device) for k, v in results.items()}

    @staticmethod
    def _per_class_rows(summary: dict, targets: list[dict]) -> torch.Tensor:
        """``[label, AP, AP50, AP75, gt boxes]`` per evaluated label (the precision array's class axis is torchmetrics'
        sorted ``classes``)."""
        classes = summary["classes"].reshape(-1).long()
        if "precision" in summary and len(classes):
            ap = per_class_average_precision(summary["precision"].numpy(), COCO_IOU_THRESHOLDS)
        else:  # no image, no box at all: nothing was evaluated
            ap = np.full((len(classes), 3), np.nan)
        labels = torch.cat([t["labels"][~t["iscrowd"]] for t in targets]) if targets else torch.zeros(0, dtype=torch.long)
        size = int(max(classes.max().item() + 1 if len(classes) else 0, labels.max().item() + 1 if len(labels) else 0))
        gt_boxes = torch.bincount(labels, minlength=size).double()
        return torch.cat([classes[:, None].double(), torch.from_numpy(ap), gt_boxes[classes][:, None]], dim=1)

    @staticmethod
    def voc07_map(preds: list[dict], targets: list[dict], iou_threshold: float = 0.5,
                  labels: Optional[list[int]] = None) -> float:
        """Mean over classes present in the GT of ``voc07_average_precision``."""
        if labels is None:
            labels = sorted({int(x) for t in targets for x in t["labels"].tolist()})
        aps = []
        for label in labels:
            matched = [_voc07_match(p, t, label, iou_threshold) for p, t in zip(preds, targets)]
            scores = np.concatenate([m[0] for m in matched]) if matched else np.zeros(0)
            hits = np.concatenate([m[1] for m in matched]) if matched else np.zeros(0, dtype=bool)
            ap = voc07_average_precision(scores, hits, sum(m[3] for m in matched))
            if not np.isnan(ap):
                aps.append(ap)
        return float(np.mean(aps)) if aps else 0.0
