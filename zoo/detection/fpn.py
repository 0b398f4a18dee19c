"""Backbone + feature pyramid shared by the detectors: any multi-stage body (``zoo.backbones.TimmFeatures`` or
``StridedConvFeatures``) followed by torchvision's ``FeaturePyramidNetwork`` (Lin et al. 2017), with P6/P7 built
from P5 as in RetinaNet, FCOS, ATSS and GFL when ``extra_levels=2``."""

from __future__ import annotations

from typing import Sequence

import timm.layers
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from zoo.contracts import pyramid_channels

__all__ = ["FeaturePyramid", "freeze_"]


def freeze_(body: nn.Module, freeze_bn: bool = False, frozen_prefixes: Sequence[str] = ()) -> nn.Module:
    """Freeze what the papers freeze when fine-tuning an ImageNet backbone: every BatchNorm (as
    ``FrozenBatchNorm2d``, statistics and affine fixed) and the parameters whose names start with a prefix (e.g.
    ``model.conv1``, ``model.bn1``, ``model.layer1``: ResNet's conv1 and res2). Returns the (possibly new) module;
    a prefix that matches nothing is an error rather than a silently trainable stem."""
    if freeze_bn:
        body = timm.layers.freeze_batch_norm_2d(body)
    for prefix in frozen_prefixes:
        matched = [p for name, p in body.named_parameters() if name.startswith(prefix)]
        if not matched and not any(name.startswith(prefix) for name, _ in body.named_buffers()):
            names = sorted({name.rsplit(".", 2)[0] for name, _ in body.named_parameters()})[:8]
            raise ValueError(f"frozen prefix '{prefix}' matches no parameter of {type(body).__name__} "
                             f"(names look like {names})")
        for p in matched:
            p.requires_grad_(False)
    return body


class FeaturePyramid(nn.Module):
    """``images (B, 3, H, W) → [P_l (B, out_channels, H/s_l, W/s_l)]`` for strides ``s_l`` in ``self.strides``.

    Args:
        body: a module returning a list of maps and exposing ``out_channels: list[int]`` and ``reductions: list[int]``.
        out_channels: channels of every pyramid level (256 in the papers).
        extra_levels: 0, or 2 for P6 and P7 by stride-2 convs on P5 (the papers' P3–P7).
        freeze_bn: turn every BatchNorm of the body into ``FrozenBatchNorm2d`` (the papers fine-tune ImageNet
            backbones with frozen statistics; leave off when training from scratch).
        frozen_prefixes: parameter-name prefixes of the body left untrained (see ``freeze_``).
    """

    def __init__(self, body: nn.Module, out_channels: int = 256, extra_levels: int = 0, freeze_bn: bool = False,
                 frozen_prefixes: Sequence[str] = ()) -> None:
        super().__init__()
        channels, reductions = pyramid_channels(body)
        if extra_levels not in (0, 2):
            raise ValueError(f"extra_levels must be 0 or 2 (P6, P7), got {extra_levels}")
        self.body = freeze_(body, freeze_bn, frozen_prefixes)
        extra = LastLevelP6P7(out_channels, out_channels) if extra_levels else None
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels
        last = reductions[-1]
        self.strides: list[int] = list(reductions) + [last * 2 ** (i + 1) for i in range(extra_levels)]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.body(images)
        return list(self.fpn({str(i): f for i, f in enumerate(features)}).values())
