"""Models used only by tests (importable by class_path because tests/ is on sys.path)."""

from typing import Any

import torch

from zoo.classification.classifier import ImageClassifier


class NaNAtStep(ImageClassifier):
    """An ImageClassifier whose loss turns NaN at global step ``nan_at_step``."""

    def __init__(self, *args: Any, nan_at_step: int = 7, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nan_at_step = nan_at_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.nan_at_step else loss
