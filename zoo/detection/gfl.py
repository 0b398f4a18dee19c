"""Generalized Focal Loss: Learning Qualified and Distributed Bounding Boxes for Dense Object Detection.

Li, Wang, Wu, Chen, Hu, Li, Tang & Yang, NeurIPS 2020, https://arxiv.org/abs/2006.04388; official code
https://github.com/implus/GFocal (mmdetection). GFL keeps ATSS's network and assigner and changes two outputs:

* the classification score of the GT class is trained towards the IoU of the predicted box (0 elsewhere) with
  Quality Focal Loss, so one score ranks detections by class and localisation and there is no centerness branch;
* each box side is a discrete distribution over ``n + 1`` bins (in strides from the anchor centre), decoded as its
  expectation and trained with Distribution Focal Loss next to GIoU.

The losses live in ``zoo.detection.losses``; the assigner in ``zoo.detection.assigners``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from zoo.detection.anchors import LevelAnchors
from zoo.detection.assigners import paired_box_iou
from zoo.detection.dense import DenseDetector
from zoo.detection.heads import DenseHead
from zoo.detection.losses import distribution_focal_loss, distribution_integral, quality_focal_loss
from zoo.distributed import all_reduce_mean
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["GFL"]


def distances_to_boxes(centers: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Anchor centres ``(N, 2)`` and side distances ``(N, 4)`` (left, top, right, bottom, in pixels) → xyxy."""
    return torch.cat([centers - distances[:, :2], centers + distances[:, 2:]], dim=1)


class GFL(DenseDetector):
    """GFL detector: ``L = QFL / N_pos + Σ_pos w (2 · GIoU + 0.25 · DFL) / Σ w`` with ``w = max_c σ(cls)`` (detached).

    Args:
        neck: backbone + FPN (P3–P7 in the paper).
        num_classes: foreground classes.
        reg_max: ``n``; each side is a distribution over bins ``0..n`` strides (16 in the paper).
        num_convs, num_groups: head towers (4 convs, GN 32).
        qfl_beta: β of QFL (2).
        box_weight, dfl_weight: GIoU (2.0) and DFL (0.25) weights.
        anchor_scale, assigner, topk, low_quality_matches: see ``DenseDetector`` (the anchor serves assignment
            only).
        **kwargs: ``DetectionModule`` arguments.
    """

    def __init__(self, *, neck: nn.Module, num_classes: int, reg_max: int = 16, num_convs: int = 4, num_groups: int = 32,
                 qfl_beta: float = 2.0, box_weight: float = 2.0, dfl_weight: float = 0.25, anchor_scale: float = 8.0,
                 assigner: Literal["atss", "max_iou"] = "atss", topk: int = 9, low_quality_matches: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(neck=neck, num_classes=num_classes, anchor_scale=anchor_scale, assigner=assigner, topk=topk,
                         low_quality_matches=low_quality_matches, **kwargs)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        self.head = DenseHead(neck.out_channels, num_classes, len(neck.strides), reg_channels=4 * (reg_max + 1),
                              num_convs=num_convs, num_groups=num_groups, centerness=False)

    def side_distances(self, reg: torch.Tensor) -> torch.Tensor:
        """Distribution logits ``(N, 4 (n + 1))`` → expected side distances ``(N, 4)`` in strides."""
        return distribution_integral(reg.reshape(len(reg), 4, self.hparams.reg_max + 1))

    def dense_losses(self, cls: torch.Tensor, reg: torch.Tensor, ctr: Optional[torch.Tensor], anchors: LevelAnchors,
                     matched: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        positive, valid = matched >= 0, matched != -2
        num_pos = all_reduce_mean(positive.sum().float()).clamp(min=1.0)

        # (P,) positives, flattened over the batch; distances in strides.
        batch = len(cls)
        centers = anchors.centers.expand(batch, -1, -1)[positive]
        strides = anchors.strides.expand(batch, -1)[positive][:, None]
        targets = gt_boxes[positive]
        reg_pos = reg[positive]
        boxes = distances_to_boxes(centers, self.side_distances(reg_pos) * strides)
        quality = paired_box_iou(boxes.detach(), targets).clamp(min=0)

        # QFL: the GT class's target is the IoU of the predicted box, every other output's is 0 (Eq. 5).
        cls_target = torch.zeros_like(cls)
        cls_target[positive, gt_labels[positive]] = quality
        scored, scored_target = (cls, cls_target) if valid.all() else (cls[valid], cls_target[valid])  # IGNORE: max-IoU
        loss_cls = quality_focal_loss(scored, scored_target, hp.qfl_beta).sum() / num_pos

        weight = cls[positive].detach().sigmoid().max(dim=1).values
        weight_sum = all_reduce_mean(weight.sum()).clamp(min=1e-6)
        loss_box = hp.box_weight * (generalized_box_iou_loss(boxes, targets, "none") * weight).sum() / weight_sum
        target_distances = torch.cat([centers - targets[:, :2], targets[:, 2:] - centers], dim=1) / strides
        target_distances = target_distances.clamp(0, hp.reg_max - 0.01)  # DFL needs y < n (its right bin)
        dfl = distribution_focal_loss(reg_pos.reshape(-1, hp.reg_max + 1), target_distances.reshape(-1))
        loss_dfl = hp.dfl_weight * (dfl.view(-1, 4).mean(dim=1) * weight).sum() / weight_sum
        return {"loss_qfl": loss_cls, "loss_box": loss_box, "loss_dfl": loss_dfl}

    def decode(self, cls: torch.Tensor, reg: torch.Tensor, ctr: Optional[torch.Tensor],
               anchors: LevelAnchors) -> tuple[torch.Tensor, torch.Tensor]:
        batch, num_anchors = reg.shape[:2]
        distances = self.side_distances(reg.reshape(batch * num_anchors, -1)) * anchors.strides.repeat(batch)[:, None]
        boxes = distances_to_boxes(anchors.centers.repeat(batch, 1), distances)
        return cls.sigmoid(), boxes.view(batch, num_anchors, 4)
