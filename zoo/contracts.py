"""The contracts between the zoo's parts, checked where the parts meet, with errors that say what to set.

* A **feature-map backbone** maps images ``(B, C, H, W)`` to one map ``(B, out_channels, h, w)`` and exposes
  ``out_channels: int`` (``zoo.backbones.TimmBackbone``, ``ConvNet``, ``ResNet``, ``WideResNet``).
* A **multi-stage backbone** returns a list of maps and exposes ``out_channels: list[int]`` and ``reductions:
  list[int]`` (``zoo.backbones.TimmFeatures``, ``StridedConvFeatures``); FPNs and two-stage detectors consume it.
* A **classification datamodule** may expose ``num_classes``; a model built for another count fails in ``setup``
  instead of training a head of the wrong size.
"""

from __future__ import annotations

from typing import Optional

import lightning as L
from torch import nn

__all__ = ["feature_channels", "pyramid_channels", "check_num_classes"]


def feature_channels(backbone: nn.Module) -> int:
    """``backbone.out_channels`` of a feature-map backbone, or a ``ValueError`` naming the backbone."""
    channels = getattr(backbone, "out_channels", None)
    if not isinstance(channels, int) or isinstance(channels, bool):
        raise ValueError(
            f"backbone {type(backbone).__name__} must expose an int `out_channels` (the channels of the feature map it "
            "returns); wrap timm models with zoo.backbones.TimmBackbone"
        )
    return channels


def pyramid_channels(body: nn.Module) -> tuple[list[int], list[int]]:
    """``(out_channels, reductions)`` of a multi-stage backbone, or a ``ValueError`` naming it."""
    channels, reductions = getattr(body, "out_channels", None), getattr(body, "reductions", None)
    if not isinstance(channels, (list, tuple)) or not isinstance(reductions, (list, tuple)) \
            or len(channels) != len(reductions) or not channels:
        raise ValueError(
            f"{type(body).__name__} must expose `out_channels: list[int]` and `reductions: list[int]`, one per "
            "returned map (zoo.backbones.TimmFeatures or StridedConvFeatures)"
        )
    return [int(c) for c in channels], [int(r) for r in reductions]


def check_num_classes(module: L.LightningModule, num_classes: Optional[int] = None, what: str = "classes") -> None:
    """Raise when the model's class count (``num_classes``, default ``module.hparams.num_classes``) differs from the
    datamodule's ``num_classes``; do nothing without a trainer, a datamodule or a count on either side."""
    trainer = module._trainer
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    data_classes = getattr(datamodule, "num_classes", None)
    if num_classes is None:
        num_classes = module.hparams.get("num_classes")
    if data_classes is not None and num_classes is not None and data_classes != num_classes:
        raise ValueError(f"model.num_classes is {num_classes} but the data has {data_classes} {what}: set "
                         f"`model.init_args.num_classes: {data_classes}`")
