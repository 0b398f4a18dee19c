"""Attribute regression (DAP-style) zero-shot baseline: ridge regression from features to class attributes.

Lampert et al.'s direct attribute prediction (DAP, CVPR 2009 / TPAMI 2014) learns each attribute from the seen
classes' images and recognises an unseen class by the attributes it predicts. This is its common linear form (as in
the xlsa17 benchmark's embedding baselines): a ridge regression ``x → a`` on the seen trainval features (standardised
with trainval statistics), solved in closed form, and the class whose attribute vector has the highest cosine
similarity to the prediction: among the unseen classes for ZSL, among all classes for GZSL.

It learns nothing from the unlabelled unseen features, and trains nothing by gradient: the ridge is solved in closed
form when an evaluation starts. ``zoo test -c configs/zsl/attribute_regression_digits.yaml`` is the whole run; ``zoo
fit`` also works (it has no optimiser, its training steps do nothing, and its validation and test solve the ridge),
so the baseline runs from the same commands as the GAN configs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from zoo.zsl.evaluation import ZeroShotModule

__all__ = ["ridge_regression", "AttributeRegressionZSL"]


def ridge_regression(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` minimising ``‖xW + b − y‖² + l2·‖W‖²`` (the bias unpenalised), in closed form (float64)."""
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    gram = xc.T @ xc + l2 * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    weight = torch.linalg.solve(gram, xc.T @ (y - y_mean))
    return weight, y_mean - x_mean @ weight


class AttributeRegressionZSL(ZeroShotModule):
    """Ridge ``x → a`` on the seen classes, nearest class attribute by cosine (see the module docstring).

    Args:
        l2: the ridge penalty (on standardised features).
        gzsl: also score GZSL (nearest among all classes' attributes).
    """

    def __init__(self, *, l2: float = 1.0, gzsl: bool = True) -> None:
        super().__init__(gzsl=gzsl)
        self.save_hyperparameters()
        self.weight: Optional[torch.Tensor] = None

    def configure_optimizers(self) -> None:
        return None  # closed form: nothing to optimise by gradient

    def training_step(self, batch: object, batch_idx: int) -> None:
        return None  # the ridge is solved from all trainval features at once, in fit_classifiers

    def fit_classifiers(self) -> None:
        with torch.inference_mode(False):
            x = self.train_features.to(self.device)
            self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-6)
            targets = self.attributes.to(self.device)[self.train_labels.to(self.device)]
            self.weight, self.bias = ridge_regression((x - self.mean) / self.std, targets, self.hparams.l2)

    def predicted_attributes(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) / self.std).double() @ self.weight + self.bias

    def classify(self, features: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        cosine = F.normalize(self.predicted_attributes(features), dim=1) @ F.normalize(
            self.attributes.to(features.device).double(), dim=1).T
        unseen = self.unseen_classes.to(features.device)
        zsl = unseen[cosine[:, unseen].argmax(1)]
        return zsl, (cosine.argmax(1) if self.gzsl else None)
