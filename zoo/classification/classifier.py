"""The reference image classifier: any backbone, global average pooling, a linear head.

This is the network form CAM (Zhou et al. 2016, see ``zoo.classification.cam``) is defined for, and the model the
foundation's demo, fine-tuning and scaling tests run on. The optimizer and scheduler come from the CLI's
``optimizer:`` / ``lr_scheduler:`` sections; without them ``configure_optimizers`` falls back to AdamW.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from zoo.classification.cam import class_activation_maps

__all__ = ["ClassifierHead", "ImageClassifier"]


class ClassifierHead(nn.Module):
    """Global average pooling → dropout → linear: ``(B, C, h, w) → (B, num_classes)``."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features.mean(dim=(2, 3))))


class ImageClassifier(L.LightningModule):
    """Backbone + GAP + linear classifier trained with cross-entropy.

    Args:
        backbone: a module mapping images ``(B, 3|1, H, W)`` to a feature map ``(B, C, h, w)`` and exposing
            ``out_channels`` (every backbone in ``zoo.backbones`` does), given in YAML by ``class_path``.
        num_classes: number of classes; must match the datamodule's ``num_classes`` when it has one.
        dropout: dropout before the linear layer.
        label_smoothing: cross-entropy label smoothing.

    Batches are ``(images, labels)``; ``predict`` returns ``{"probs": (B, K), "preds": (B,)}``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not isinstance(getattr(backbone, "out_channels", None), int):
            raise ValueError(
                f"backbone {type(backbone).__name__} must expose an int `out_channels` (the channels of the feature "
                "map it returns); wrap timm models with zoo.backbones.TimmBackbone"
            )
        self.backbone = backbone
        self.head = ClassifierHead(backbone.out_channels, num_classes, dropout)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def class_activation_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, K), CAMs (B, K, h, w))`` from one forward pass; see ``zoo.classification.cam``."""
        features = self.backbone(images)
        return self.head(features), class_activation_maps(features, self.head.fc.weight)

    def setup(self, stage: str) -> None:
        data_classes = getattr(self.trainer.datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.hparams.num_classes:
            raise ValueError(
                f"model.num_classes is {self.hparams.num_classes} but the data has {data_classes} classes: "
                f"set `model.init_args.num_classes: {data_classes}`"
            )

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        logits = self(images)
        loss = self.criterion(logits, labels)
        accuracy = getattr(self, f"{stage}_acc")
        accuracy(logits, labels)
        # Loss tensors need sync_dist for an all-process mean; torchmetrics objects sync their own state.
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True,
                 sync_dist=stage != "train", batch_size=len(labels))
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self(images).softmax(-1)
        return {"probs": probs, "preds": probs.argmax(-1)}

    def configure_optimizers(self) -> Any:
        # Used only when the config has no `optimizer:` section (the CLI then replaces this method).
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
