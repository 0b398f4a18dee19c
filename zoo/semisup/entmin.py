"""Entropy Minimization.

Grandvalet & Bengio, "Semi-supervised Learning by Entropy Minimization", NIPS 2004. Maximise the labeled
log-likelihood minus ``λ`` times the entropy of the predictions on unlabeled data: the decision boundary is pushed
into low-density regions. Unlike pseudo-labelling, the gradient flows through the predicted distribution itself
(``∂H/∂z_j = −p_j (log p_j + H)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zoo.semisup.base import SemiSupervisedClassifier
from zoo.schedules import linear_rampup
from zoo.semisup.losses import entropy
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["EntropyMinimization"]


class EntropyMinimization(SemiSupervisedClassifier):
    """Cross-entropy on labeled images + ``λ(t) · mean H(p(·|x_u))`` on the weak view of unlabeled images.

    Args:
        entropy_weight: ``λ``, the paper's only hyperparameter (chosen by cross-validation there).
        rampup: fraction of training over which ``λ`` grows linearly from 0. Minimising entropy from the first step
            makes the random initial predictions confident and locks them in (often all in one class).
        Other arguments: see ``SemiSupervisedClassifier``.
    """

    unlabeled_views = ("weak",)

    def __init__(self, *, backbone: nn.Module, num_classes: int, entropy_weight: float = 1.0, rampup: float = 0.2,
                 **kwargs: Any) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, **kwargs)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled

    def unlabeled_loss(self, logits: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        ramp = linear_rampup(self.training_progress(), self.hparams.rampup)
        mean_entropy = entropy(logits["weak"]).mean()
        weight = self.hparams.entropy_weight * ramp
        return weight * mean_entropy, {"entropy": mean_entropy.detach(), "unsup_weight": weight}
