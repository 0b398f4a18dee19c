"""ATSS: Bridging the Gap Between Anchor-based and Anchor-free Detection via Adaptive Training Sample Selection.

Zhang, Chi, Yao, Lei & Li, CVPR 2020, https://arxiv.org/abs/1912.02424; official code
https://github.com/sfzhang15/ATSS (maskrcnn-benchmark). The detector is RetinaNet with one square anchor per location,
GroupNorm towers, a centerness branch and GIoU box loss; what the paper adds is the assigner
(``zoo.detection.assigners.ATSSAssigner``): positives are the candidates nearest each box's centre whose IoU is above
the mean + std of the candidates' IoUs. ``assigner="max_iou"`` swaps in RetinaNet's fixed IoU thresholds with the same
head and losses, the paper's Table 1/3 comparison.

Differences from the official code: boxes use continuous coordinates (no "+1" pixel convention); anchors sit at
``(x + ½)·stride``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from zoo.detection.anchors import LevelAnchors
from zoo.detection.dense import DenseDetector
from zoo.detection.heads import DenseHead
from zoo.detection.losses import centerness_target
from zoo.distributed import all_reduce_mean
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["ATSS"]


class ATSS(DenseDetector):
    """ATSS detector: ``L = FL(cls) / N_pos + 2 · Σ ctr* · GIoU / Σ ctr* + BCE(ctr, ctr*) / N_pos``.

    Args:
        neck: the backbone + FPN (``zoo.detection.fpn.FeaturePyramid``; P3–P7 in the paper).
        num_classes: foreground classes.
        num_convs, num_groups: head towers (4 convs, GN 32).
        focal_alpha, focal_gamma: focal loss (0.25, 2).
        box_weight: GIoU loss weight (2.0).
        anchor_scale, assigner, topk, low_quality_matches: see ``DenseDetector``.
        **kwargs: ``DetectionModule`` arguments (optimiser, schedule, test-time selection).

    Test-time score: ``√(σ(cls) · σ(ctr))``.
    """

    def __init__(self, *, neck: nn.Module, num_classes: int, num_convs: int = 4, num_groups: int = 32,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, box_weight: float = 2.0, anchor_scale: float = 8.0,
                 assigner: Literal["atss", "max_iou"] = "atss", topk: int = 9, low_quality_matches: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(neck=neck, num_classes=num_classes, anchor_scale=anchor_scale, assigner=assigner, topk=topk,
                         low_quality_matches=low_quality_matches, **kwargs)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        self.head = DenseHead(neck.out_channels, num_classes, len(neck.strides), reg_channels=4, num_convs=num_convs,
                              num_groups=num_groups, centerness=True)
        # The official box coder: deltas (dx, dy, dw, dh) weighted (10, 10, 5, 5), dw/dh clipped at log(1000/16).
        self.box_coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0), bbox_xform_clip=math.log(1000.0 / 16))

    def dense_losses(self, cls: torch.Tensor, reg: torch.Tensor, ctr: Optional[torch.Tensor], anchors: LevelAnchors,
                     matched: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        positive, valid = matched >= 0, matched != -2
        num_pos = all_reduce_mean(positive.sum().float()).clamp(min=1.0)
        cls_target = torch.zeros_like(cls)
        cls_target[positive, gt_labels[positive]] = 1.0
        scored, scored_target = (cls, cls_target) if valid.all() else (cls[valid], cls_target[valid])  # IGNORE: max-IoU
        loss_cls = sigmoid_focal_loss(scored, scored_target, hp.focal_alpha, hp.focal_gamma, "sum") / num_pos

        # (P,) positives, flattened over the batch.
        anchor_boxes = anchors.boxes.expand(len(cls), -1, -1)[positive]
        targets = gt_boxes[positive]
        boxes = self.box_coder.decode_single(reg[positive], anchor_boxes)
        centers = (anchor_boxes[:, :2] + anchor_boxes[:, 2:]) / 2
        ltrb = torch.cat([centers - targets[:, :2], targets[:, 2:] - centers], dim=1)
        ctr_target = centerness_target(ltrb)
        # Normalised by the centerness sum averaged over processes (official: reduce_sum / world size).
        ctr_sum = all_reduce_mean(ctr_target.sum()).clamp(min=1e-6)
        loss_box = hp.box_weight * (generalized_box_iou_loss(boxes, targets, "none") * ctr_target).sum() / ctr_sum
        loss_ctr = F.binary_cross_entropy_with_logits(ctr[positive], ctr_target, reduction="sum") / num_pos
        return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_centerness": loss_ctr}

    def decode(self, cls: torch.Tensor, reg: torch.Tensor, ctr: Optional[torch.Tensor],
               anchors: LevelAnchors) -> tuple[torch.Tensor, torch.Tensor]:
        batch, num_anchors = reg.shape[:2]
        boxes = self.box_coder.decode_single(reg.reshape(-1, 4), anchors.boxes.repeat(batch, 1))
        scores = (cls.sigmoid() * ctr.sigmoid().unsqueeze(-1)).sqrt()
        return scores, boxes.view(batch, num_anchors, 4)
