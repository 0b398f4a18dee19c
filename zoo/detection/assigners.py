"""Assigners: which ground-truth box, if any, each anchor learns from.

Contract (as torchvision's ``Matcher``): an assigner returns ``matched (A,)`` int64 holding the index of the GT box
of each anchor, ``NEGATIVE = -1`` for background and ``IGNORE = -2`` for anchors that take part in no loss. Both
run in fp32 with autocast off (box areas overflow fp16) and are vectorised over anchors × boxes; the only Python
loop is over FPN levels (≤ 5).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

__all__ = ["NEGATIVE", "IGNORE", "paired_box_iou", "ATSSAssignment", "ATSSAssigner", "MaxIoUAssigner"]

NEGATIVE = -1
IGNORE = -2


def paired_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of ``a[..., i]`` with ``b[..., i]`` for two ``(..., 4)`` xyxy tensors of one shape → ``(...)``."""
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(dim=-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-7)


class ATSSAssignment(NamedTuple):
    """``matched (A,)``; for inspection: ``candidates (K, G)`` anchor indices, ``thresholds (G,)`` mean + std."""

    matched: torch.Tensor
    candidates: torch.Tensor
    thresholds: torch.Tensor


class ATSSAssigner:
    """Adaptive Training Sample Selection (Zhang et al. 2020, Algorithm 1).

    For each GT: on every level the ``topk`` anchors whose centres are nearest the GT centre are candidates
    (``min(topk, N_level)``, so tiny maps do not crash, mmdet#3428); the IoU threshold is the mean plus the
    (unbiased, as in the official code) standard deviation of the candidates' IoUs; candidates at or above it whose
    centre lies inside the GT (every side distance > ``min_inside``) are positive. An anchor positive for several
    GTs takes the one with the highest IoU. Everything else is negative: ATSS has no ignore band.

    Args:
        topk: candidates per level (9 in the paper; multiply by the anchors per location if there are several).
        min_inside: the minimal distance from the anchor centre to every GT side (0.01 px as in the official code).
    """

    def __init__(self, topk: int = 9, min_inside: float = 0.01) -> None:
        self.topk, self.min_inside = topk, min_inside

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def assign(self, anchors: torch.Tensor, num_per_level: list[int], gt_boxes: torch.Tensor) -> ATSSAssignment:
        """``anchors (A, 4)``, ``num_per_level`` summing to ``A``, ``gt_boxes (G, 4)`` → ``ATSSAssignment``."""
        anchors, gt_boxes = anchors.float(), gt_boxes.float()
        num_anchors, num_gt = len(anchors), len(gt_boxes)
        if num_gt == 0:
            empty = anchors.new_zeros(0, 0, dtype=torch.long)
            return ATSSAssignment(anchors.new_full((num_anchors,), NEGATIVE, dtype=torch.long), empty,
                                  anchors.new_zeros(0))
        anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2
        gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        # Computed directly, as the official code and mmdetection do: torch.cdist switches to a matrix-multiply
        # formula above 25 rows, ~0.1 px^2 off at COCO image sizes in fp32, which reorders near-equidistant anchors.
        distances = (anchor_centers[:, None, :] - gt_centers[None, :, :]).pow(2).sum(-1).sqrt()  # (A, G)

        candidates, start = [], 0
        for count in num_per_level:
            k = min(self.topk, count)
            if k > 0:
                nearest = distances[start:start + count].topk(k, dim=0, largest=False).indices  # (k, G)
                candidates.append(nearest + start)
            start += count
        candidates = torch.cat(candidates)  # (K, G)
        # IoUs of the candidates only: the full (A, G) matrix would dominate the time and memory (22k x 100 on COCO).
        candidate_ious = paired_box_iou(anchors[candidates], gt_boxes.expand(len(candidates), -1, -1))  # (K, G)
        spread = candidate_ious.std(dim=0) if len(candidates) > 1 else torch.zeros_like(candidate_ious[0])
        thresholds = candidate_ious.mean(dim=0) + spread

        centers = anchor_centers[candidates]  # (K, G, 2)
        side_distances = torch.stack([centers[..., 0] - gt_boxes[:, 0], centers[..., 1] - gt_boxes[:, 1],
                                      gt_boxes[:, 2] - centers[..., 0], gt_boxes[:, 3] - centers[..., 1]], dim=-1)
        positive = (candidate_ious >= thresholds) & (side_distances.min(dim=-1).values > self.min_inside)

        # An anchor positive for several GTs goes to the one with the highest IoU (ties: the lowest GT index).
        anchor_index = candidates[positive]
        gt_index = torch.arange(num_gt, device=anchors.device).expand_as(candidates)[positive]
        pair_iou = candidate_ious[positive]
        best_iou = anchors.new_full((num_anchors,), -1.0).scatter_reduce(0, anchor_index, pair_iou, "amax")
        winner = pair_iou == best_iou[anchor_index]
        matched = anchors.new_full((num_anchors,), num_gt, dtype=torch.long)
        matched.scatter_reduce_(0, anchor_index[winner], gt_index[winner], "amin")
        matched[matched == num_gt] = NEGATIVE
        return ATSSAssignment(matched, candidates, thresholds)

    def __call__(self, anchors: torch.Tensor, num_per_level: list[int], gt_boxes: torch.Tensor) -> torch.Tensor:
        return self.assign(anchors, num_per_level, gt_boxes).matched


class MaxIoUAssigner:
    """RetinaNet's rule (Lin et al. 2017): IoU ≥ ``positive_iou`` is positive, < ``negative_iou`` negative, in
    between ignored; with ``low_quality_matches`` each GT also keeps its highest-IoU anchors (torchvision's
    ``Matcher``, which this wraps). The baseline ATSS is compared with (Zhang et al. 2020, Table 1)."""

    def __init__(self, positive_iou: float = 0.5, negative_iou: float = 0.4, low_quality_matches: bool = True) -> None:
        self.matcher = Matcher(positive_iou, negative_iou, allow_low_quality_matches=low_quality_matches)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def __call__(self, anchors: torch.Tensor, num_per_level: list[int], gt_boxes: torch.Tensor) -> torch.Tensor:
        if len(gt_boxes) == 0:
            return anchors.new_full((len(anchors),), NEGATIVE, dtype=torch.long)
        matched = self.matcher(box_iou(gt_boxes.float(), anchors.float()))  # Matcher takes (G, A)
        matched[matched == Matcher.BELOW_LOW_THRESHOLD] = NEGATIVE
        matched[matched == Matcher.BETWEEN_THRESHOLDS] = IGNORE
        return matched
