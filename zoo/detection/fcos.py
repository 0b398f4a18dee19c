"""torchvision's FCOS (Tian et al. 2019) on the zoo's backbone, data and schedule: the reference the zoo's detectors
are measured against ("beside a torchvision peer with the same backbone and budget").

The model is ``torchvision.models.detection.FCOS`` unchanged (its head, centre sampling, losses and
post-processing); only its input transform is bypassed, because ``DetectionModule`` already normalises and pads and
the datamodule resizes. Its points sit at ``x · stride`` (torchvision's ``AnchorGenerator``), half a stride from the
zoo's ``(x + ½) · stride`` anchors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList

from zoo.detection.base import DetectionModule, ImageSizes
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["TorchvisionFCOS"]


class TorchvisionFCOS(DetectionModule):
    """``torchvision.models.detection.FCOS`` with one anchor point per location of side = stride (its default).

    Args:
        neck: backbone + FPN (``zoo.detection.fpn.FeaturePyramid``).
        num_classes: foreground classes.
        num_convs: convs per head tower (4 in FCOS).
        center_sampling_radius: FCOS's centre sampling radius in strides (1.5).
        **kwargs: ``DetectionModule`` arguments.
    """

    def __init__(self, *, neck: nn.Module, num_classes: int, num_convs: int = 4, center_sampling_radius: float = 1.5,
                 **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        hp = self.hparams
        anchors = AnchorGenerator(tuple((s,) for s in neck.strides), ((1.0,),) * len(neck.strides))
        self.model = FCOS(neck, num_classes, anchor_generator=anchors,
                          head=FCOSHead(neck.out_channels, 1, num_classes, num_convs),
                          center_sampling_radius=center_sampling_radius, score_thresh=hp.score_threshold,
                          nms_thresh=hp.nms_threshold, detections_per_img=hp.max_detections,
                          topk_candidates=hp.candidates_per_level)

    def _forward(self, images: torch.Tensor, image_sizes: ImageSizes) -> tuple[dict, list, list[int], ImageList]:
        image_list = ImageList(images, image_sizes)
        features = self.model.backbone(images)
        head_outputs = self.model.head(features)
        anchors = self.model.anchor_generator(image_list, features)
        return head_outputs, anchors, [f.shape[-2] * f.shape[-1] for f in features], image_list

    def compute_losses(self, images: torch.Tensor, image_sizes: ImageSizes,
                       targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        head_outputs, anchors, num_per_level, _ = self._forward(images, image_sizes)
        return self.model.compute_loss(targets, head_outputs, anchors, num_per_level)

    def detect(self, images: torch.Tensor, image_sizes: ImageSizes) -> list[dict[str, torch.Tensor]]:
        head_outputs, anchors, num_per_level, image_list = self._forward(images, image_sizes)
        split_outputs = {k: list(v.split(num_per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(num_per_level)) for a in anchors]
        return self.model.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)
