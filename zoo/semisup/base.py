"""The training skeleton every single-network semi-supervised method here shares, and the supervised-only baseline.

A batch from ``datamodules.semisup`` is ``{"labeled": (x_l, y_l), "unlabeled": ((x_weak, x_strong), y_hidden)}``.
The labeled images and the unlabeled views a method needs go through the network in **one** forward pass, so batch
norm sees the joint batch (UDA's ``image/main.py`` and USB's ``use_cat`` do the same). ``y_hidden`` is the true label
of each unlabeled image (``-1`` where unknown, e.g. STL-10's unlabeled split); it only feeds the logged pseudo-label
accuracy, never a loss.

``SemiSupervisedClassifier`` itself is the supervised-only baseline (it uses only ``x_l``); ``EntropyMinimization``
(``zoo.semisup.entmin``) and ``UDA`` (``zoo.semisup.uda``) override ``unlabeled_loss``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from zoo.classifier import ClassificationModule, Classifier
from zoo.ema import EMATeacher
from zoo.schedules import warmup_cosine
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["SemiSupervisedClassifier"]


class SemiSupervisedClassifier(ClassificationModule):
    """Supervised-only training on the labeled stream: the baseline every semi-supervised method is measured against.

    Args:
        backbone: feature extractor exposing ``out_channels`` (``zoo.backbones.WideResNet`` for the CIFAR protocol,
            ``zoo.backbones.ConvNet`` for digits), given in YAML by ``class_path``.
        num_classes: number of classes.
        dropout: dropout before the linear layer.
        label_smoothing: on the supervised cross-entropy.
        lr, momentum, nesterov, weight_decay: the built-in SGD (UDA: 0.03, 0.9, Nesterov, 5e-4 on every weight, as
            UDA's L2 term is). A config's ``optimizer:`` / ``lr_scheduler:`` sections replace it.
        warmup_steps, cosine_cycles: the per-step schedule ``zoo.schedules.warmup_cosine`` over
            ``trainer.estimated_stepping_batches``.
        ema_decay: if set, evaluate (and save as ``ema``) an exponential moving average of the network's weights and
            batch-norm statistics, updated after every step (``zoo.ema.EMATeacher``; UDA's code evaluates one).

    Subclasses set ``unlabeled_views`` (which of ``"weak"``, ``"strong"`` they need) and implement
    ``unlabeled_loss(logits: dict[view, (N, K)], step) -> (loss, logs)``.
    """

    unlabeled_views: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        backbone: nn.Module,
        num_classes: int,
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
        lr: float = 0.03,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        warmup_steps: int = 0,
        cosine_cycles: float = 7 / 16,
        ema_decay: Optional[float] = None,
    ) -> None:
        super().__init__(num_classes=num_classes)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        self.network = Classifier(backbone, num_classes, dropout)
        self.ema = EMATeacher(self.network, ema_decay, ramp=False) if ema_decay is not None else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The evaluated model: the EMA of the network when ``ema_decay`` is set, else the network."""
        return self.ema(images) if self.ema is not None else self.network(images)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after the step, before any callback (a checkpoint) sees the weights of this step.
        if self.ema is not None:
            self.ema.update(self.network)

    def training_progress(self) -> float:
        """``t / T`` in [0, 1]: this step over the run's total (``max_steps`` or epochs × batches)."""
        total = self.trainer.estimated_stepping_batches
        return min(1.0, self.global_step / total) if math.isfinite(total) and total > 0 else 0.0

    def supervised_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.hparams.label_smoothing)
        return loss, {}

    def unlabeled_loss(self, logits: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError  # only reached when a subclass lists unlabeled_views without implementing this

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images_l, labels_l = batch["labeled"]
        (images_weak, images_strong), hidden_labels = batch["unlabeled"]
        views = {"weak": images_weak, "strong": images_strong}
        inputs = [images_l] + [views[v] for v in self.unlabeled_views]
        logits = self.network(torch.cat(inputs)).split([len(x) for x in inputs])
        sup_loss, logs = self.supervised_loss(logits[0], labels_l)
        loss = sup_loss
        if self.unlabeled_views:
            unlabeled = dict(zip(self.unlabeled_views, logits[1:]))
            unsup_loss, unsup_logs = self.unlabeled_loss(unlabeled)
            loss = loss + unsup_loss
            logs.update(unsup_logs, unsup_loss=unsup_loss.detach())
            known = hidden_labels >= 0
            if known.any():
                pseudo = next(iter(unlabeled.values())).detach().argmax(-1)
                logs["pseudo_label_acc"] = (pseudo[known] == hidden_labels[known]).float().mean()
        logs.update(sup_loss=sup_loss.detach(), loss=loss.detach())
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False,
                      batch_size=len(labels_l))
        return loss

    def configure_optimizers(self) -> Any:
        # Used only when the config has no `optimizer:` section (the CLI then replaces this method).
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
                                    weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, int(total), hp.warmup_steps, hp.cosine_cycles))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
