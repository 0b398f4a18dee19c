"""The one-stage detector skeleton ATSS and GFL share: FPN → dense head → one square anchor per location →
per-image assignment → the paper's losses (subclass) → per-level top-k, NMS.

The only Python loops of a training step are over the images of the batch (assignment, as torchvision does) and over
FPN levels; everything inside is vectorised over anchors × boxes.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import nn

from zoo.detection.anchors import LevelAnchors, square_anchors
from zoo.detection.assigners import ATSSAssigner, MaxIoUAssigner
from zoo.detection.base import DetectionModule, ImageSizes, select_detections
from zoo.detection.heads import DenseHead

__all__ = ["DenseDetector"]


class DenseDetector(DetectionModule):
    """Shared parts of the dense detectors; subclasses set ``self.head`` and implement ``dense_losses`` and
    ``decode``.

    Args:
        neck: ``zoo.detection.fpn.FeaturePyramid`` (anything returning a list of maps with ``out_channels`` and
            ``strides``).
        num_classes: foreground classes.
        anchor_scale: anchor side in strides (8 in the papers; 4 suits the 16–40 px digits of the embedded set).
        assigner: ``atss`` (Zhang et al. 2020) or ``max_iou`` (RetinaNet's IoU ≥ 0.5 / < 0.4, the ATSS paper's
            baseline).
        topk: ATSS candidates per level.
        low_quality_matches: ``max_iou`` only: each box also keeps its highest-IoU anchors (RetinaNet does).
        **kwargs: ``DetectionModule`` arguments (optimiser, schedule, test-time selection, metrics).
    """

    def __init__(self, *, neck: nn.Module, num_classes: int, anchor_scale: float = 8.0,
                 assigner: Literal["atss", "max_iou"] = "atss", topk: int = 9, low_quality_matches: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        self.neck = neck
        self.assigner = (ATSSAssigner(topk) if assigner == "atss"
                         else MaxIoUAssigner(low_quality_matches=low_quality_matches))
        self.head: Optional[DenseHead] = None

    def anchors(self, features: list[torch.Tensor]) -> LevelAnchors:
        return square_anchors([tuple(f.shape[-2:]) for f in features], self.neck.strides, self.hparams.anchor_scale,
                              features[0].device)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], LevelAnchors]:
        """``images (B, 3, H, W)`` → ``(cls (B, A, C), reg (B, A, R), ctr (B, A) | None, anchors)``."""
        features = self.neck(images)
        cls, reg, ctr = self.head(features)
        return cls, reg, ctr, self.anchors(features)

    def assign(self, anchors: LevelAnchors, targets: list[dict[str, torch.Tensor]]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(matched (B, A), gt boxes (B, A, 4), gt labels (B, A))``; rows of unmatched anchors hold box 0 / label 0
        and are masked by ``matched < 0`` (``NEGATIVE``, ``IGNORE``)."""
        matched, boxes, labels = [], [], []
        for t in targets:
            m = self.assigner(anchors.boxes, anchors.num_per_level, t["boxes"])
            index = m.clamp(min=0)
            if len(t["boxes"]):
                boxes.append(t["boxes"].float()[index])
                labels.append(t["labels"][index])
            else:
                boxes.append(anchors.boxes.new_zeros(len(m), 4))
                labels.append(m.new_zeros(len(m)))
            matched.append(m)
        return torch.stack(matched), torch.stack(boxes), torch.stack(labels)

    def compute_losses(self, images: torch.Tensor, image_sizes: ImageSizes,
                       targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        cls, reg, ctr, anchors = self(images)
        with torch.autocast(images.device.type, enabled=False):  # box areas and IoUs overflow fp16
            matched, gt_boxes, gt_labels = self.assign(anchors, targets)
            return self.dense_losses(cls.float(), reg.float(), None if ctr is None else ctr.float(), anchors,
                                     matched, gt_boxes, gt_labels)

    def dense_losses(self, cls: torch.Tensor, reg: torch.Tensor, ctr: Optional[torch.Tensor], anchors: LevelAnchors,
                     matched: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement dense_losses")

    def decode(self, cls: torch.Tensor, reg: torch.Tensor, ctr: Optional[torch.Tensor],
               anchors: LevelAnchors) -> tuple[torch.Tensor, torch.Tensor]:
        """Head outputs → ``(scores (B, A, C) in [0, 1], boxes (B, A, 4))``."""
        raise NotImplementedError(f"{type(self).__name__} must implement decode")

    def detect(self, images: torch.Tensor, image_sizes: ImageSizes) -> list[dict[str, torch.Tensor]]:
        cls, reg, ctr, anchors = self(images)
        with torch.autocast(images.device.type, enabled=False):
            scores, boxes = self.decode(cls.float(), reg.float(), None if ctr is None else ctr.float(), anchors)
            hp = self.hparams
            return [select_detections(s, b, anchors.num_per_level, size, hp.score_threshold, hp.candidates_per_level,
                                      hp.nms_threshold, hp.max_detections)
                    for s, b, size in zip(scores, boxes, image_sizes)]
