"""Faster R-CNN with a feature pyramid: the two-stage detector Soft Teacher trains.

Ren, He, Girshick & Sun, "Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks", NeurIPS
2015, https://arxiv.org/abs/1506.01497, with the FPN of Lin et al., CVPR 2017, https://arxiv.org/abs/1612.03144.
Settings follow mmdetection's ``faster_rcnn_r50_fpn`` (the base of microsoft/SoftTeacher): RPN anchors at IoU
0.7 / 0.3, 256 per image at half foreground; RoI sampling 512 per image at 25 % foreground (IoU ≥ 0.5), ground-truth
boxes added to the proposals; a two-FC box head with class-specific regression (targets scaled by (10, 10, 5, 5));
test score 0.05, class-wise NMS 0.5, 100 detections.

Built from torchvision's parts, as ``torchvision.models.detection.FasterRCNN`` is: ``RegionProposalNetwork`` (its
``AnchorGenerator``, ``RPNHead``, ``BoxCoder``, sampler and proposal filter), ``MultiScaleRoIAlign``, ``TwoMLPHead``,
``FastRCNNPredictor`` and ``RoIHeads``' sampling and post-processing; the zoo's ``FeaturePyramid`` is the
backbone. What torchvision keeps inside one ``forward`` is opened up into steps (``features`` → ``propose`` →
``sample`` → ``box_outputs`` → ``roi_losses`` / ``postprocess``) because Soft Teacher re-enters them: the teacher
scores the student's proposals, regresses jittered boxes, and the classification loss is re-weighted per proposal
(``roi_losses`` returns it unreduced).

Differences from mmdetection: no P6 level for the RPN (the zoo's pyramid returns the body's levels), smooth-L1
(β = 1/9) box losses as torchvision's instead of L1, and RoI-to-level mapping with torchvision's canonical scale.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign

from zoo.checkpoint import drop_module_hyperparameters
from zoo.detection.base import DetectionModule, ImageSizes

__all__ = ["RPNOutput", "roi_losses", "TwoStageNetwork", "FasterRCNN"]

Targets = list[dict[str, torch.Tensor]]


class RPNOutput(NamedTuple):
    """The RPN's outputs on a batch of ``B`` images with ``A`` anchors each."""

    proposals: list[torch.Tensor]  # per image (≤ post_nms_top_n, 4), detached, clipped
    objectness: torch.Tensor  # (B, A) logits
    deltas: torch.Tensor  # (B, A, 4)
    anchors: list[torch.Tensor]  # per image (A, 4)


def roi_losses(logits: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor, regression_targets: torch.Tensor,
               beta: float = 1 / 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-RoI losses, unreduced: ``(cross-entropy (R,), smooth-L1 of the labelled class's deltas (R,))``.

    ``logits (R, C + 1)`` with background at 0, ``deltas (R, (C + 1)·4)`` class-specific, ``labels (R,)`` in 0..C,
    ``regression_targets (R, 4)``. The box loss is 0 for background RoIs. torchvision's ``fastrcnn_loss`` is
    ``ce.mean()`` and ``box.sum() / R``; Soft Teacher weights the cross-entropy per RoI first.
    """
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    picked = deltas.float().view(len(deltas), -1, 4)[torch.arange(len(deltas), device=deltas.device), labels]
    # Background RoIs of an image without boxes are matched to torchvision's dummy zero box (infinite targets).
    foreground = (labels > 0)[:, None]
    targets = torch.where(foreground, regression_targets.float(), picked.detach())
    box = F.smooth_l1_loss(picked, targets, beta=beta, reduction="none").sum(dim=1)
    return ce, torch.where(foreground[:, 0], box, 0.0)


class TwoStageNetwork(nn.Module):
    """Every weight of a Faster R-CNN (pyramid, RPN, box head) and its steps, without training logic: the
    LightningModule owns one, and Soft Teacher's EMA teacher is a frozen copy of it.

    Args:
        neck: ``zoo.detection.fpn.FeaturePyramid`` (exposing ``out_channels`` and ``strides``).
        num_classes: foreground classes (the box head adds background, column 0).
        anchor_sizes: one anchor size per pyramid level (mmdetection: 8 strides, i.e. 32..256 for P2–P5).
        anchor_ratios: height / width ratios at every level.
        rpn_pre_nms, rpn_post_nms: proposals kept per level before and per image after the RPN's NMS (0.7), for
            training and testing (mmdetection: 2000/1000 in training, 1000/1000 at test).
        rpn_batch_size: anchors sampled per image for the RPN loss (256, half foreground).
        roi_batch_size, roi_positive_fraction, roi_fg_iou: RoI sampling (512, 0.25, 0.5).
        representation_size: width of the two FC layers (1024).
        roi_canonical_scale: the box side mapped to level 4 by ``MultiScaleRoIAlign`` (224, FPN's Eq. 1).
        score_threshold, nms_threshold, max_detections: test-time selection (0.05, 0.5, 100).
    """

    def __init__(self, neck: nn.Module, num_classes: int, anchor_sizes: Sequence[int] = (32, 64, 128, 256),
                 anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0), rpn_pre_nms: tuple[int, int] = (2000, 1000),
                 rpn_post_nms: tuple[int, int] = (1000, 1000), rpn_batch_size: int = 256, roi_batch_size: int = 512,
                 roi_positive_fraction: float = 0.25, roi_fg_iou: float = 0.5, representation_size: int = 1024,
                 roi_canonical_scale: int = 224, score_threshold: float = 0.05, nms_threshold: float = 0.5,
                 max_detections: int = 100) -> None:
        super().__init__()
        levels = len(neck.strides)
        if len(anchor_sizes) != levels:
            raise ValueError(f"anchor_sizes needs one size per pyramid level: {levels} levels (strides "
                             f"{neck.strides}), got {list(anchor_sizes)}")
        self.neck = neck
        anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), (tuple(anchor_ratios),) * levels)
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(neck.out_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=rpn_batch_size, positive_fraction=0.5,
            pre_nms_top_n=dict(training=rpn_pre_nms[0], testing=rpn_pre_nms[1]),
            post_nms_top_n=dict(training=rpn_post_nms[0], testing=rpn_post_nms[1]), nms_thresh=0.7)
        self.level_names = [str(i) for i in range(levels)]
        pool = MultiScaleRoIAlign(self.level_names, output_size=7, sampling_ratio=2,
                                  canonical_scale=roi_canonical_scale)
        self.roi_heads = RoIHeads(
            pool, TwoMLPHead(neck.out_channels * 7 * 7, representation_size),
            FastRCNNPredictor(representation_size, num_classes + 1),
            fg_iou_thresh=roi_fg_iou, bg_iou_thresh=roi_fg_iou, batch_size_per_image=roi_batch_size,
            positive_fraction=roi_positive_fraction, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
            score_thresh=score_threshold, nms_thresh=nms_threshold, detections_per_img=max_detections)
        self.num_classes = num_classes

    def features(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Padded normalised ``images (B, 3, H, W)`` → pyramid levels by name."""
        return OrderedDict(zip(self.level_names, self.neck(images)))

    def propose(self, features: "OrderedDict[str, torch.Tensor]", images: torch.Tensor,
                image_sizes: ImageSizes) -> RPNOutput:
        """The RPN's forward (``RegionProposalNetwork.forward`` without its loss)."""
        rpn, levels = self.rpn, list(features.values())
        objectness, deltas = rpn.head(levels)
        anchors = rpn.anchor_generator(ImageList(images, image_sizes), levels)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        with torch.autocast(images.device.type, enabled=False):  # box decoding overflows fp16
            decoded = rpn.box_coder.decode(deltas.detach().float(), anchors).view(len(anchors), -1, 4)
            proposals, _ = rpn.filter_proposals(decoded, objectness.float(), image_sizes, per_level)
        return RPNOutput(proposals, objectness.view(len(anchors), -1), deltas.view(len(anchors), -1, 4), anchors)

    def rpn_losses(self, rpn_out: RPNOutput, targets: Targets, images: Optional[Sequence[int]] = None
                   ) -> dict[str, torch.Tensor]:
        """The RPN's objectness and box losses on the images ``images`` (default: all) against ``targets`` (one per
        image of the batch, ``boxes`` only). No image: zero losses without a graph."""
        images = list(range(len(targets))) if images is None else list(images)
        if not images:
            zero = rpn_out.objectness.new_zeros(())
            return {"loss_rpn_cls": zero, "loss_rpn_box": zero.clone()}
        rpn = self.rpn
        with torch.autocast(rpn_out.objectness.device.type, enabled=False):
            anchors = [rpn_out.anchors[i] for i in images]
            labels, matched = rpn.assign_targets_to_anchors(anchors, [{"boxes": targets[i]["boxes"].float()}
                                                                      for i in images])
            regression = [t.float() for t in rpn.box_coder.encode(matched, anchors)]
            index = torch.as_tensor(images, device=rpn_out.objectness.device)
            objectness, box = rpn.compute_loss(rpn_out.objectness[index].float().reshape(-1, 1),
                                               rpn_out.deltas[index].float().reshape(-1, 4), labels, regression)
        return {"loss_rpn_cls": objectness, "loss_rpn_box": box}

    def sample(self, proposals: list[torch.Tensor], targets: Targets
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """RoI sampling (``RoIHeads.select_training_samples``): the ground-truth boxes join the proposals, each RoI
        takes its best box at IoU ≥ ``roi_fg_iou`` (label 1..C) or is background (0), then ``roi_batch_size`` are
        drawn at ``roi_positive_fraction`` foreground. Targets' labels are 0..C−1. Returns per image ``(rois,
        labels, regression targets)``."""
        shifted = [{"boxes": t["boxes"].float(), "labels": t["labels"] + 1} for t in targets]
        rois, _, labels, regression = self.roi_heads.select_training_samples([p.float() for p in proposals], shifted)
        return rois, labels, regression

    def box_outputs(self, features: "OrderedDict[str, torch.Tensor]", boxes: list[torch.Tensor],
                    image_sizes: ImageSizes) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image boxes → ``(logits (R, C + 1), class-specific deltas (R, (C + 1)·4))`` for their concatenation."""
        heads = self.roi_heads
        pooled = heads.box_roi_pool(features, [b.to(features[self.level_names[0]].dtype) for b in boxes], image_sizes)
        return heads.box_predictor(heads.box_head(pooled))

    def decode(self, deltas: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """Class-specific deltas on their RoIs → boxes ``(R, C + 1, 4)`` (unclipped)."""
        return self.roi_heads.box_coder.decode(deltas.float(), [b.float() for b in boxes])

    def postprocess(self, logits: torch.Tensor, deltas: torch.Tensor, boxes: list[torch.Tensor],
                    image_sizes: ImageSizes) -> list[dict[str, torch.Tensor]]:
        """Softmax, per-class boxes clipped, score threshold, class-wise NMS, the best ``max_detections``; labels
        0..C−1 (``RoIHeads.postprocess_detections``)."""
        boxes_, scores, labels = self.roi_heads.postprocess_detections(logits.float(), deltas.float(),
                                                                       [b.float() for b in boxes], image_sizes)
        return [{"boxes": b, "scores": s, "labels": lab - 1} for b, s, lab in zip(boxes_, scores, labels)]

    def detect(self, images: torch.Tensor, image_sizes: ImageSizes,
               features: Optional["OrderedDict[str, torch.Tensor]"] = None) -> list[dict[str, torch.Tensor]]:
        """Padded normalised images (or their ``features``) → per image ``{"boxes", "scores", "labels"}``."""
        features = self.features(images) if features is None else features
        proposals = self.propose(features, images, image_sizes).proposals
        logits, deltas = self.box_outputs(features, proposals, image_sizes)
        with torch.autocast(images.device.type, enabled=False):
            return self.postprocess(logits, deltas, proposals, image_sizes)

    def supervised_losses(self, images: torch.Tensor, image_sizes: ImageSizes, targets: Targets
                          ) -> dict[str, torch.Tensor]:
        """The four Faster R-CNN losses, reduced as torchvision does."""
        features = self.features(images)
        rpn_out = self.propose(features, images, image_sizes)
        losses = self.rpn_losses(rpn_out, targets)
        rois, labels, regression = self.sample(rpn_out.proposals, targets)
        logits, deltas = self.box_outputs(features, rois, image_sizes)
        with torch.autocast(images.device.type, enabled=False):
            ce, box = roi_losses(logits, deltas, torch.cat(labels), torch.cat(regression))
        losses.update(loss_cls=ce.mean(), loss_box=box.sum() / max(len(box), 1))
        return losses


class FasterRCNN(DetectionModule):
    """Faster R-CNN + FPN as a zoo detector (see the module docstring); the supervised baseline of Soft Teacher.

    Args:
        neck: a ``FeaturePyramid`` (the paper's setting: ResNet-50, P2–P5, 256 channels, frozen BN and stem).
        num_classes: foreground classes.
        anchor_sizes, anchor_ratios, rpn_pre_nms, rpn_post_nms, rpn_batch_size, roi_batch_size,
            roi_positive_fraction, roi_fg_iou, representation_size, roi_canonical_scale: see ``TwoStageNetwork``.
        nms_threshold: class-wise test NMS (0.5).
        **kwargs: ``DetectionModule`` arguments (optimiser, schedule, ``score_threshold`` 0.05, ``max_detections``).
    """

    def __init__(self, *, neck: nn.Module, num_classes: int, anchor_sizes: Sequence[int] = (32, 64, 128, 256),
                 anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0), rpn_pre_nms: tuple[int, int] = (2000, 1000),
                 rpn_post_nms: tuple[int, int] = (1000, 1000), rpn_batch_size: int = 256, roi_batch_size: int = 512,
                 roi_positive_fraction: float = 0.25, roi_fg_iou: float = 0.5, representation_size: int = 1024,
                 roi_canonical_scale: int = 224, nms_threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, nms_threshold=nms_threshold, **kwargs)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        hp = self.hparams
        self.detector = TwoStageNetwork(
            neck, num_classes, anchor_sizes, anchor_ratios, tuple(rpn_pre_nms), tuple(rpn_post_nms), rpn_batch_size,
            roi_batch_size, roi_positive_fraction, roi_fg_iou, representation_size, roi_canonical_scale,
            hp.score_threshold, hp.nms_threshold, hp.max_detections)

    def compute_losses(self, images: torch.Tensor, image_sizes: ImageSizes,
                       targets: Targets) -> dict[str, torch.Tensor]:
        return self.detector.supervised_losses(images, image_sizes, targets)

    def detect(self, images: torch.Tensor, image_sizes: ImageSizes) -> list[dict[str, torch.Tensor]]:
        return self.detector.detect(images, image_sizes)
