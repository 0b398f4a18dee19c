"""UDA: Unsupervised Data Augmentation for consistency training.

Xie, Dai, Hovy, Luong & Le, "Unsupervised Data Augmentation for Consistency Training", NeurIPS 2020. The prediction
on a strongly augmented unlabeled image (RandAugment + Cutout) is pulled towards the sharpened prediction on its
weak view; confident targets only (confidence masking), and the supervised loss is annealed (TSA) so the model does
not overfit the few labels before the unlabeled signal arrives. Losses: ``zoo.semisup.losses``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zoo.semisup.base import SemiSupervisedClassifier
from zoo.semisup.losses import TSASchedule, entropy, sharpened_consistency, tsa_cross_entropy, tsa_threshold
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["UDA"]


class UDA(SemiSupervisedClassifier):
    """``L = L_sup^TSA + λ · mean_i m_i KL(sharpen(p(x_i^weak), τ) ‖ p(x_i^strong)) [+ β · mean H(p(x^weak))]``.

    Args:
        unsup_weight: ``λ`` (1 in the paper's image experiments).
        temperature: ``τ`` of the sharpened target (0.4 on CIFAR-10).
        confidence_threshold: ``β``; a target counts only when its un-sharpened max probability exceeds it (0.8).
        tsa: Training Signal Annealing schedule, ``none`` (the CIFAR scripts), ``linear``, ``log`` or ``exp``.
        ent_min_weight: optional entropy term on the weak view (UDA's ``ent_min_coeff``, 0 by default).
        Other arguments: see ``SemiSupervisedClassifier``.
    """

    unlabeled_views = ("weak", "strong")

    def __init__(
        self,
        *,
        backbone: nn.Module,
        num_classes: int,
        unsup_weight: float = 1.0,
        temperature: float = 0.4,
        confidence_threshold: float = 0.8,
        tsa: TSASchedule = "none",
        ent_min_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, **kwargs)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        tsa_threshold(0.0, num_classes, tsa)  # a wrong schedule name fails here, not at the first step

    def supervised_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        threshold = tsa_threshold(self.training_progress(), self.hparams.num_classes, self.hparams.tsa)
        loss, kept = tsa_cross_entropy(logits, labels, threshold, self.hparams.label_smoothing)
        return loss, {"tsa_threshold": threshold, "sup_kept_ratio": kept.float().mean()}

    def unlabeled_loss(self, logits: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        hp = self.hparams
        consistency, mask = sharpened_consistency(logits["weak"], logits["strong"], hp.temperature,
                                                  hp.confidence_threshold)
        loss = hp.unsup_weight * consistency
        if hp.ent_min_weight > 0:
            loss = loss + hp.ent_min_weight * entropy(logits["weak"]).mean()
        return loss, {"consistency": consistency.detach(), "mask_rate": mask.float().mean()}
