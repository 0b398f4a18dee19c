"""Classical semi-supervised baselines on the exact split a zoo model is tested on, logged beside its test accuracy."""

from __future__ import annotations

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from sklearn.linear_model import LogisticRegression
from sklearn.semi_supervised import LabelSpreading

__all__ = ["SemiSupervisedBaselines"]


class SemiSupervisedBaselines(Callback):
    """At the end of ``test``, log two pixel baselines as ``baseline/logreg_acc`` and ``baseline/label_spreading_acc``:

    * logistic regression (C = 1) on the labeled pixels only: what the labels alone give a linear model;
    * label spreading (Zhou et al. 2004; kNN graph, k = 7) over labeled + unlabeled pixels, then predicting the test
      pixels: a classical method that does use the unlabeled images.

    The datamodule must provide ``pixel_arrays(split) -> (X (N, D), y (N,))`` for ``"labeled"``, ``"unlabeled"`` and
    ``"test"`` (``DigitsSemiSupDataModule`` does); otherwise the callback warns and does nothing.
    """

    def __init__(self, n_neighbors: int = 7) -> None:
        self.n_neighbors = n_neighbors

    def on_test_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        pixel_arrays = getattr(trainer.datamodule, "pixel_arrays", None)
        if pixel_arrays is None:
            rank_zero_warn("SemiSupervisedBaselines: the datamodule has no `pixel_arrays(split)`; no baselines computed")
            return
        x_l, y_l = pixel_arrays("labeled")
        x_u, _ = pixel_arrays("unlabeled")
        x_test, y_test = pixel_arrays("test")
        logreg = LogisticRegression(C=1.0, max_iter=5000).fit(x_l, y_l)
        spreading = LabelSpreading(kernel="knn", n_neighbors=self.n_neighbors, max_iter=1000).fit(
            np.concatenate([x_l, x_u]), np.concatenate([y_l, np.full(len(x_u), -1)]))
        pl_module.log("baseline/logreg_acc", float(logreg.score(x_test, y_test)), rank_zero_only=True)
        pl_module.log("baseline/label_spreading_acc", float(spreading.score(x_test, y_test)), rank_zero_only=True)
