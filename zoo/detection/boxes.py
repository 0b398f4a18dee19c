"""Boxes between augmented views of one image, as Soft Teacher moves them (Xu et al. 2021, §3; the official
``ssod/utils/structure_utils.py`` and ``Transform2D``).

Every view records the 3×3 matrix ``T`` that takes a pixel of the original image to the view (resize, flip, affine
ops; colour ops and erasing leave it alone). A box seen in view ``a`` goes to view ``b`` through ``T_b · T_a⁻¹``: its
four corners are mapped, the new box is their min/max, clipped to view ``b``. Exact (and invertible) for flips,
scales and translations; for rotations and shears the box is the axis-aligned hull of the mapped corners, as the
official code and torchvision's ``v2.functional.affine`` on ``BoundingBoxes`` do.

Everything is vectorised over boxes: each box carries its own matrix (``matrices[image_index]``), so a batch is one
call, with no loop over images or boxes.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["view_to_view", "transform_points", "transform_boxes"]


def view_to_view(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 3)`` matrices ``T_target · T_source⁻¹`` taking view ``source``'s pixels to view ``target``'s."""
    return target.double() @ torch.linalg.inv(source.double())


def transform_points(points: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """``points (N, K, 2)`` through ``matrices (N, 3, 3)`` (one per row) → ``(N, K, 2)``, in float64 then back."""
    homogeneous = torch.cat([points.double(), points.new_ones(points.shape[:-1] + (1,), dtype=torch.float64)], dim=-1)
    mapped = homogeneous @ matrices.double().transpose(1, 2)
    return (mapped[..., :2] / mapped[..., 2:]).to(points.dtype)


def transform_boxes(boxes: torch.Tensor, matrices: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``boxes (N, 4)`` xyxy, each through its matrix ``matrices (N, 3, 3)``: four corners, min/max, then clipped to
    ``sizes (N, 2)`` ``(h, w)`` of the target view when given. Keeps the dtype of ``boxes``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    corners = torch.stack([torch.stack([x1, y1], -1), torch.stack([x2, y1], -1), torch.stack([x1, y2], -1),
                           torch.stack([x2, y2], -1)], dim=1)
    mapped = transform_points(corners, matrices)
    out = torch.cat([mapped.amin(dim=1), mapped.amax(dim=1)], dim=-1)
    if sizes is not None:
        limits = sizes.flip(-1).to(out.dtype).repeat(1, 2)  # (w, h, w, h)
        out = torch.minimum(out.clamp(min=0), limits)
    return out
