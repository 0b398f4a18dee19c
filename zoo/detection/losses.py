"""Dense-detection losses the papers add to torchvision's (``sigmoid_focal_loss``, ``generalized_box_iou_loss``).

All take and return fp32 and are elementwise (``reduction`` is the caller's: the papers normalise by the number of
positives, all-reduced across processes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["centerness_target", "quality_focal_loss", "distribution_focal_loss", "distribution_integral"]


def centerness_target(ltrb: torch.Tensor) -> torch.Tensor:
    """FCOS/ATSS centerness ``√(min(l,r)/max(l,r) · min(t,b)/max(t,b))`` of side distances ``(N, 4)`` → ``(N,)``.

    Example:
        >>> centerness_target(torch.tensor([[1.0, 1, 1, 1], [1, 1, 3, 1]])).tolist()  # doctest: +ELLIPSIS
        [1.0, 0.577...]
    """
    left_right, top_bottom = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
    ratio = (left_right.min(dim=1).values / left_right.max(dim=1).values.clamp(min=1e-6)) * (
        top_bottom.min(dim=1).values / top_bottom.max(dim=1).values.clamp(min=1e-6))
    return ratio.clamp(min=0).sqrt()


def quality_focal_loss(logits: torch.Tensor, quality: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Quality Focal Loss (Li et al. 2020, Eq. 5): ``−|y − σ|^β ((1 − y) log(1 − σ) + y log σ)``, elementwise.

    ``logits`` and ``quality`` (soft targets ``y`` in [0, 1]: the IoU of the predicted box at its GT class, 0 at
    every other class and at background) have the same shape. With 0/1 targets this is sigmoid focal loss with
    ``γ = β`` and no α. ``|·|`` rather than the original code's bare power, which is NaN for a fractional β.
    """
    logits, quality = logits.float(), quality.float()
    scale = (quality - logits.sigmoid()).abs().pow(beta)
    return F.binary_cross_entropy_with_logits(logits, quality, reduction="none") * scale


def distribution_integral(logits: torch.Tensor) -> torch.Tensor:
    """The expectation ``Σ_i i · softmax(logits)_i`` over the last dimension of ``(..., n + 1)`` (GFL Eq. 6)."""
    bins = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
    return logits.float().softmax(dim=-1) @ bins


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distribution Focal Loss (Li et al. 2020, Eq. 6): ``(y_r − y) CE(S, y_l) + (y − y_l) CE(S, y_r)`` with
    ``y_l = ⌊y⌋``, ``y_r = y_l + 1``, for ``logits (N, n + 1)`` and targets ``(N,)`` in ``[0, n)``.

    Raises on a target ≥ n (its right bin does not exist): callers clamp to ``n − 0.01`` (the official code uses
    ``n − 0.1``)."""
    logits, target = logits.float(), target.float()
    num_bins = logits.shape[-1]
    if len(target) and (target.min() < 0 or target.max() >= num_bins - 1):
        raise ValueError(f"DFL targets must lie in [0, {num_bins - 1}), got [{target.min():.3f}, {target.max():.3f}]")
    left = target.floor().long()
    weight_left = left + 1 - target
    return (F.cross_entropy(logits, left, reduction="none") * weight_left
            + F.cross_entropy(logits, left + 1, reduction="none") * (1 - weight_left))
