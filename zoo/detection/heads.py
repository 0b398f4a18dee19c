"""The RetinaNet-style dense head ATSS and GFL share: a classification tower and a regression tower of
conv3×3 → GroupNorm → ReLU, shared across FPN levels, with a learnable scale per level on the regression output."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["Scale", "DenseHead"]


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level: the levels share the head but not the box scale)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _tower(channels: int, num_convs: int, num_groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(min(num_groups, channels), channels),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class DenseHead(nn.Module):
    """``[P_l (B, C_in, H_l, W_l)] → (cls (B, A, num_classes), reg (B, A, reg_channels), ctr (B, A) | None)``, one
    anchor per location, ``A = Σ_l H_l W_l`` concatenated level by level in row-major order.

    Args:
        in_channels: FPN channels.
        num_classes: foreground classes (sigmoid outputs, no background column).
        num_levels: FPN levels (one ``Scale`` each).
        reg_channels: 4 box deltas (ATSS) or ``4 (n + 1)`` distribution logits (GFL).
        num_convs: convs per tower (4 in the papers).
        num_groups: GroupNorm groups (32).
        centerness: add ATSS's centerness output on the regression tower.
        prior_prob: initial foreground probability of the classifier (bias ``−log((1 − π)/π)``, π = 0.01).
    """

    def __init__(self, in_channels: int, num_classes: int, num_levels: int, reg_channels: int = 4, num_convs: int = 4,
                 num_groups: int = 32, centerness: bool = True, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.cls_tower = _tower(in_channels, num_convs, num_groups)
        self.reg_tower = _tower(in_channels, num_convs, num_groups)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.box_regression = nn.Conv2d(in_channels, reg_channels, 3, padding=1)
        self.centerness: Optional[nn.Conv2d] = nn.Conv2d(in_channels, 1, 3, padding=1) if centerness else None
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        if len(features) != len(self.scales):
            raise ValueError(f"DenseHead was built for {len(self.scales)} levels, got {len(features)}")
        cls, reg, ctr = [], [], []
        for feature, scale in zip(features, self.scales):
            cls_feature, reg_feature = self.cls_tower(feature), self.reg_tower(feature)
            # (B, K, H, W) -> (B, HW, K)
            cls.append(self.cls_logits(cls_feature).flatten(2).transpose(1, 2))
            reg.append(scale(self.box_regression(reg_feature)).flatten(2).transpose(1, 2))
            if self.centerness is not None:
                ctr.append(self.centerness(reg_feature).flatten(1))
        return torch.cat(cls, 1), torch.cat(reg, 1), torch.cat(ctr, 1) if ctr else None
