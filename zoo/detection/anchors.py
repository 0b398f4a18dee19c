"""One square anchor per feature-map location and level, as ATSS and GFL use (``#A = 1``, Zhang et al. 2020, §4).

Two-stage detectors (R-FCN) use torchvision's multi-ratio ``AnchorGenerator`` inside its RPN instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["LevelAnchors", "square_anchors"]


class LevelAnchors(NamedTuple):
    """Anchors of all levels, concatenated level by level in row-major order.

    ``boxes (A, 4)`` xyxy, ``centers (A, 2)`` xy, ``strides (A,)``, ``num_per_level``: the count on each level.
    """

    boxes: torch.Tensor
    centers: torch.Tensor
    strides: torch.Tensor
    num_per_level: list[int]


def square_anchors(feature_sizes: list[tuple[int, int]], strides: list[int], scale: float,
                   device: torch.device | None = None) -> LevelAnchors:
    """Anchors of side ``scale · stride`` centred at ``((x + ½)·stride, (y + ½)·stride)`` of every location.

    Example:
        >>> a = square_anchors([(1, 2)], [8], scale=4)
        >>> a.boxes.tolist(), a.num_per_level
        ([[-12.0, -12.0, 20.0, 20.0], [-4.0, -12.0, 28.0, 20.0]], [2])
    """
    boxes, centers, level_strides = [], [], []
    for (h, w), stride in zip(feature_sizes, strides):
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
        c = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1).add_(0.5).mul_(stride)  # (h*w, 2)
        half = scale * stride / 2
        boxes.append(torch.cat([c - half, c + half], dim=1))
        centers.append(c)
        level_strides.append(torch.full((h * w,), float(stride), device=device))
    return LevelAnchors(torch.cat(boxes), torch.cat(centers), torch.cat(level_strides), [h * w for h, w in feature_sizes])
