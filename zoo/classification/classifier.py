"""The reference image classifier: any backbone, global average pooling, a linear head.

This is the network form CAM (Zhou et al. 2016, see ``zoo.cam``) is defined for, and the model the
foundation's demo, fine-tuning and scaling tests run on. The optimizer and scheduler come from the CLI's
``optimizer:`` / ``lr_scheduler:`` sections; without them ``configure_optimizers`` falls back to AdamW. The head and
the evaluation steps are the shared ones of ``zoo.classifier``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from zoo.cam import class_activation_maps
from zoo.classifier import ClassificationModule, ClassifierHead
from zoo.contracts import feature_channels
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["ImageClassifier"]


class ImageClassifier(ClassificationModule):
    """Backbone + GAP + linear classifier trained with cross-entropy.

    Args:
        backbone: a module mapping images ``(B, 3|1, H, W)`` to a feature map ``(B, C, h, w)`` and exposing
            ``out_channels`` (every backbone in ``zoo.backbones`` does), given in YAML by ``class_path``.
        num_classes: number of classes; must match the datamodule's ``num_classes`` when it has one.
        dropout: dropout before the linear layer.
        label_smoothing: cross-entropy label smoothing (training and the logged evaluation loss).

    Batches are ``(images, labels)``; ``predict`` returns ``{"probs": (B, K), "preds": (B,)}``.
    """

    def __init__(self, *, backbone: nn.Module, num_classes: int, dropout: float = 0.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(num_classes=num_classes)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        self.backbone = backbone
        self.head = ClassifierHead(feature_channels(backbone), num_classes, dropout)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def class_activation_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, K), CAMs (B, K, h, w))`` from one forward pass; see ``zoo.cam``."""
        features = self.backbone(images)
        return self.head(features), class_activation_maps(features, self.head.fc.weight)

    def evaluation_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.criterion(logits, labels)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        logits = self(images)
        loss = self.criterion(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        # Used only when the config has no `optimizer:` section (the CLI then replaces this method).
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
