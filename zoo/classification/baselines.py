"""Classical baselines measured on the very split a zoo model is tested on, reported beside its test metrics."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["PixelBaselines"]


class PixelBaselines(Callback):
    """At the end of ``test``, fit logistic regression and 1-nearest-neighbour on the training pixels and log their
    test accuracy as ``baseline/logreg_acc`` and ``baseline/1nn_acc``, so they print in the same table as ``test/acc``.

    The datamodule must provide ``pixel_arrays(split) -> (X (N, D), y (N,))`` for ``"train"`` and ``"test"``
    (``DigitsDataModule`` does); otherwise the callback warns and does nothing.
    """

    def on_test_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        pixel_arrays = getattr(trainer.datamodule, "pixel_arrays", None)
        if pixel_arrays is None:
            rank_zero_warn("PixelBaselines: the datamodule has no `pixel_arrays(split)`; no baselines computed")
            return
        x_train, y_train = pixel_arrays("train")
        x_test, y_test = pixel_arrays("test")
        models = {
            "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
            "1nn": KNeighborsClassifier(n_neighbors=1),
        }
        for name, model in models.items():
            accuracy = float(model.fit(x_train, y_train).score(x_test, y_test))
            pl_module.log(f"baseline/{name}_acc", accuracy, rank_zero_only=True)
