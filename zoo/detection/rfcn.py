"""R-FCN: Object Detection via Region-based Fully Convolutional Networks.

Dai, Li, He & Sun, NIPS 2016, https://arxiv.org/abs/1605.06409; official code https://github.com/daijifeng001/R-FCN
(MATLAB + Caffe) and https://github.com/msracver/Deformable-ConvNets (MXNet, the authors' recommended version).

A two-stage detector whose per-RoI work is almost free: the last conv layer emits k²(C + 1) position-sensitive
score maps (map (i, j, c) answers "class c, seen at cell (i, j) of a k × k grid over the object") and 4k² box maps;
a RoI reads cell (i, j) of its own grid only from map (i, j, ·) (PS-RoI pooling), and the k² cell scores vote by
averaging. Proposals come from torchvision's RPN on block4; the PS maps sit on the atrous block5 (output stride 16).
Because every RoI is cheap, online hard example mining (OHEM, Shrivastava et al. 2016) ranks all proposals by loss
and trains on the hardest per image.

Differences from the official code: ``torchvision.ops.ps_roi_align`` replaces PS-RoI pooling (torchvision's
``ps_roi_pool`` never reads the last feature row and column); training is end-to-end (the paper's 4-step alternation
is not reproduced); boxes use continuous coordinates.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import box_iou, ps_roi_align

from zoo.contracts import pyramid_channels
from zoo.detection.base import DetectionModule, ImageSizes, select_detections
from zoo.detection.fpn import freeze_
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["PositionSensitiveHead", "ohem_select", "RFCN"]


class PositionSensitiveHead(nn.Module):
    """``(feature (B, C_in, H, W), rois (R, 5) [batch, x1, y1, x2, y2]) → (logits (R, C + 1), deltas (R, 4))``.

    A 1×1 conv reduces the block5 features (2048 → 1024 in the paper); 1×1 convs make k²(C + 1) class maps and 4k²
    class-agnostic box maps, laid out class-major (channel ``(c·k + i)·k + j`` is class ``c``, cell ``(i, j)``),
    which is the layout ``ps_roi_align`` reads. Each RoI's output is the mean of its k² cells (the paper's voting).

    Args:
        in_channels: channels of the block5 feature map.
        num_classes: foreground classes (the head adds background, column 0).
        k: the grid (7 in the paper; ``k = 1`` removes position sensitivity, the paper's failing ablation).
        hidden_channels: the reduction conv's width (1024).
        spatial_scale: ``1 / stride`` of the feature map.
        sampling_ratio: bilinear samples per cell side (−1: adaptive, so small RoIs see every row and column).
    """

    def __init__(self, in_channels: int, num_classes: int, k: int = 7, hidden_channels: int = 1024,
                 spatial_scale: float = 1 / 16, sampling_ratio: int = -1) -> None:
        super().__init__()
        self.k, self.spatial_scale, self.sampling_ratio = k, spatial_scale, sampling_ratio
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, hidden_channels, 1), nn.ReLU(inplace=True))
        self.cls_maps = nn.Conv2d(hidden_channels, k * k * (num_classes + 1), 1)
        self.box_maps = nn.Conv2d(hidden_channels, k * k * 4, 1)
        for conv in (self.cls_maps, self.box_maps):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def vote(self, maps: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """PS-RoI align then the mean over the k × k cells: ``(B, k²·D, H, W), (R, 5) → (R, D)``."""
        pooled = ps_roi_align(maps, rois, self.k, self.spatial_scale, self.sampling_ratio)  # (R, D, k, k)
        return pooled.mean(dim=(2, 3))

    def forward(self, feature: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.reduce(feature)
        return self.vote(self.cls_maps(hidden), rois), self.vote(self.box_maps(hidden), rois)


def ohem_select(losses: torch.Tensor, image_index: torch.Tensor, per_image: int) -> torch.Tensor:
    """Online hard example mining: a bool mask of the ``per_image`` highest-loss RoIs of every image.

    ``losses (R,)`` (detached, classification + box loss per RoI) and ``image_index (R,)``. No NMS on the losses
    (as the official ``BoxAnnotatorOHEM``). Vectorised: RoIs are ordered by loss, then stably by image, so each
    image's RoIs come out hardest first and the rank within the image is the position minus the image's start.
    """
    by_loss = losses.argsort(descending=True, stable=True)
    order = by_loss[image_index[by_loss].argsort(stable=True)]
    counts = torch.bincount(image_index, minlength=int(image_index.max()) + 1 if len(image_index) else 0)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(len(order), device=losses.device) - starts[image_index[order]]
    selected = torch.zeros_like(losses, dtype=torch.bool)
    selected[order[rank < per_image]] = True
    return selected


class RFCN(DetectionModule):
    """R-FCN with an RPN (anchors {128, 256, 512} × {0.5, 1, 2} in the paper), PS score/box maps and OHEM.

    Args:
        body: a multi-stage backbone returning ``[block4, block5]`` at the same stride (``TimmFeatures`` with
            ``out_indices: [3, 4]`` and ``output_stride: 16``, or ``StridedConvFeatures``), exposing ``out_channels``
            and ``reductions``.
        num_classes: foreground classes.
        k: PS grid size (7).
        hidden_channels: the head's reduction conv (1024).
        anchor_sizes, anchor_ratios: RPN anchors.
        rpn_pre_nms, rpn_post_nms, rpn_nms_threshold: proposals (6000 → NMS 0.7 → 300, train and test).
        rpn_batch_size: anchors sampled per image for the RPN loss (256, half positive; IoU ≥ 0.7 / < 0.3).
        fg_iou: a RoI is foreground at IoU ≥ 0.5 with a GT, background otherwise.
        sampling: ``ohem`` (all proposals + GT scored, the ``rois_per_image`` hardest kept) or ``random``
            (Fast R-CNN's 25 % foreground sample of ``rois_per_image``), the paper's Table 3 comparison.
        rois_per_image: 128.
        freeze_bn: BatchNorm as ``FrozenBatchNorm2d`` (with ImageNet weights; off from scratch).
        frozen_prefixes: parameter-name prefixes of the body left untrained (``[model.conv1, model.bn1,
            model.layer1]`` is the paper's conv1 + res2 on a timm ResNet).
        **kwargs: ``DetectionModule`` arguments (the paper tests with NMS 0.3).
    """

    def __init__(self, *, body: nn.Module, num_classes: int, k: int = 7, hidden_channels: int = 1024,
                 anchor_sizes: Sequence[int] = (128, 256, 512), anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 rpn_pre_nms: int = 6000, rpn_post_nms: int = 300, rpn_nms_threshold: float = 0.7,
                 rpn_batch_size: int = 256, fg_iou: float = 0.5, sampling: Literal["ohem", "random"] = "ohem",
                 rois_per_image: int = 128, freeze_bn: bool = False, frozen_prefixes: Sequence[str] = (),
                 nms_threshold: float = 0.3, **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, nms_threshold=nms_threshold, **kwargs)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        channels, reductions = pyramid_channels(body)
        if len(channels) != 2 or len(set(reductions)) != 1:
            raise ValueError(f"R-FCN needs a body returning [block4, block5] at one stride (got channels {channels}, "
                             f"strides {reductions}): e.g. TimmFeatures(out_indices=[3, 4], output_stride=16)")
        self.body = freeze_(body, freeze_bn, frozen_prefixes)
        self.stride = reductions[0]
        anchors = AnchorGenerator((tuple(anchor_sizes),), (tuple(anchor_ratios),))
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(channels[0], anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=rpn_batch_size, positive_fraction=0.5,
            pre_nms_top_n=dict(training=rpn_pre_nms, testing=rpn_pre_nms),
            post_nms_top_n=dict(training=rpn_post_nms, testing=rpn_post_nms), nms_thresh=rpn_nms_threshold)
        self.head = PositionSensitiveHead(channels[1], num_classes, k, hidden_channels, 1.0 / self.stride)
        # Targets normalised by std (0.1, 0.1, 0.2, 0.2), i.e. weights (10, 10, 5, 5).
        self.box_coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
        self.random_sampler = BalancedPositiveNegativeSampler(rois_per_image, 0.25)

    def proposals(self, images: torch.Tensor, image_sizes: ImageSizes,
                  targets: Optional[list[dict[str, torch.Tensor]]] = None
                  ) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
        """``(block5 features, proposals per image (≤ rpn_post_nms, 4), RPN losses)``."""
        block4, block5 = self.body(images)
        with torch.autocast(images.device.type, enabled=False):
            boxes, rpn_losses = self.rpn(ImageList(images, image_sizes), OrderedDict(p=block4.float()), targets)
        return block5, boxes, rpn_losses

    @staticmethod
    def _rois(boxes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image boxes → ``(rois (R, 5) [image, x1, y1, x2, y2], image_index (R,))``."""
        image_index = torch.cat([torch.full((len(b),), i, device=b.device, dtype=torch.long) for i, b in enumerate(boxes)])
        return torch.cat([image_index[:, None].to(boxes[0].dtype), torch.cat(boxes)], dim=1), image_index

    def compute_losses(self, images: torch.Tensor, image_sizes: ImageSizes,
                       targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        hp = self.hparams
        block5, proposals, rpn_losses = self.proposals(images, image_sizes, targets)
        # GT boxes join the proposals (the official OHEM forwards "all proposals plus GT").
        rois_per_image = [torch.cat([p.detach(), t["boxes"]]) for p, t in zip(proposals, targets)]
        labels, regression = [], []
        for rois, t in zip(rois_per_image, targets):
            if len(t["boxes"]):
                best_iou, best_gt = box_iou(rois, t["boxes"]).max(dim=1)
                foreground = best_iou >= hp.fg_iou
                labels.append(torch.where(foreground, t["labels"][best_gt] + 1, 0))
                regression.append(self.box_coder.encode_single(t["boxes"][best_gt], rois))
            else:
                labels.append(torch.zeros(len(rois), dtype=torch.long, device=rois.device))
                regression.append(torch.zeros_like(rois))
        if hp.sampling == "random":
            positives, negatives = self.random_sampler([(lab > 0).long() - (lab < 0).long() for lab in labels])
            keep = [p.bool() | n.bool() for p, n in zip(positives, negatives)]
            rois_per_image = [r[k] for r, k in zip(rois_per_image, keep)]
            labels = [lab[k] for lab, k in zip(labels, keep)]
            regression = [g[k] for g, k in zip(regression, keep)]
        rois, image_index = self._rois(rois_per_image)
        labels, regression = torch.cat(labels), torch.cat(regression)
        logits, deltas = self.head(block5, rois)

        with torch.autocast(images.device.type, enabled=False):
            logits, deltas = logits.float(), deltas.float()
            foreground = labels > 0
            ce = F.cross_entropy(logits, labels, reduction="none")
            box = F.smooth_l1_loss(deltas, regression, beta=1.0, reduction="none").sum(dim=1) * foreground
            if hp.sampling == "ohem":
                selected = ohem_select((ce + box).detach(), image_index, hp.rois_per_image)
            else:
                selected = torch.ones_like(foreground)
            # CE averaged over the kept RoIs; the box loss summed over kept foreground and scaled by the same count.
            count = selected.sum().clamp(min=1)
            loss_cls = (ce * selected).sum() / count
            loss_box = (box * selected).sum() / count
        return {"loss_rpn_cls": rpn_losses["loss_objectness"], "loss_rpn_box": rpn_losses["loss_rpn_box_reg"],
                "loss_cls": loss_cls, "loss_box": loss_box}

    def detect(self, images: torch.Tensor, image_sizes: ImageSizes) -> list[dict[str, torch.Tensor]]:
        hp = self.hparams
        block5, proposals, _ = self.proposals(images, image_sizes)
        rois, image_index = self._rois(proposals)
        logits, deltas = self.head(block5, rois)
        with torch.autocast(images.device.type, enabled=False):
            probs = logits.float().softmax(dim=1)[:, 1:]  # background is column 0
            boxes = self.box_coder.decode_single(deltas.float(), rois[:, 1:].float())
            counts = [len(p) for p in proposals]
            return [select_detections(p, b, [len(p)], size, hp.score_threshold, hp.candidates_per_level,
                                      hp.nms_threshold, hp.max_detections)
                    for p, b, size in zip(probs.split(counts), boxes.split(counts), image_sizes)]
