"""What every image classifier in the zoo shares: the head, the network, and the evaluation around them.

* ``ClassifierHead``: global average pooling → dropout → linear, ``(B, C, h, w) → (B, K)``; the form CAM is defined
  for.
* ``Classifier``: a feature-map backbone (``zoo.contracts.feature_channels``) followed by that head.
* ``ClassificationModule``: the LightningModule base that owns the accuracy metrics and the validation, test and
  predict steps. A paper implements ``__init__`` (its networks) and ``training_step``; ``forward(images)`` gives the
  logits that are evaluated (an EMA student, a teacher, the plain network). The reference classifier
  (``zoo.classification.classifier``), the semi-supervised classifiers (``zoo.semisup``) and API-Net
  (``zoo.finegrained``) build on it.

Batches for evaluation are ``(images, labels, ...)``; ``predict`` returns ``{"probs": (B, K), "preds": (B,)}``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from zoo.contracts import check_num_classes, feature_channels

__all__ = ["ClassifierHead", "Classifier", "ClassificationModule"]


class ClassifierHead(nn.Module):
    """Global average pooling → dropout → linear: ``(B, C, h, w) → (B, num_classes)``."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features.mean(dim=(2, 3))))


class Classifier(nn.Module):
    """A feature-map backbone followed by ``ClassifierHead``: images ``(B, C, H, W)`` → logits ``(B, K)``."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = ClassifierHead(feature_channels(backbone), num_classes, dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class ClassificationModule(L.LightningModule):
    """Accuracy metrics and the evaluation steps of a ``num_classes``-way image classifier.

    Logs ``<stage>/loss`` (cross-entropy, averaged over processes) and ``<stage>/acc`` (top-1, a torchmetrics object,
    so exact over processes) for ``stage`` in ``val`` and ``test``. ``setup`` checks ``num_classes`` against the
    datamodule's. Subclasses call ``super().__init__(num_classes=...)``, build their networks, define ``forward`` and
    ``training_step``, and may override ``evaluation_loss`` (e.g. with label smoothing).
    """

    def __init__(self, *, num_classes: int) -> None:
        super().__init__()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def setup(self, stage: str) -> None:
        check_num_classes(self, self.val_acc.num_classes)

    def evaluation_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)

    def evaluation_step(self, batch: Any, stage: str) -> torch.Tensor:
        """Logits of an evaluation batch, with its loss and accuracy logged under ``stage``; returns the logits."""
        images, labels = batch[0], batch[1]
        logits = self(images)
        accuracy = getattr(self, f"{stage}_acc")
        accuracy(logits, labels)
        # Loss tensors need sync_dist for an all-process mean; torchmetrics objects sync their own state.
        self.log(f"{stage}/loss", self.evaluation_loss(logits, labels), on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=len(labels))
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return logits

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluation_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self(images).softmax(-1)
        return {"probs": probs, "preds": probs.argmax(-1)}
