"""How zero-shot models are scored, and the LightningModule skeleton they share.

Xian et al. (2018, §4.2) score zero-shot learning by the **mean per-class top-1 accuracy**, so that a large class
does not dominate: ``acc = 1/|Y| Σ_c (#correct in c / #images of c)``.

* ZSL (the paper's T1): test_unseen images, classified among the unseen classes only.
* GZSL: test_seen and test_unseen images, classified among ALL classes; ``S`` and ``U`` are the per-class mean
  accuracies on the seen and unseen test images, and ``H = 2SU / (S + U)`` (0 when either is 0).

``ZeroShotModule`` reads the data contract of ``datamodules.zsl.ZSLFeatureDataModule`` in ``setup`` (the class
attributes, which classes are seen and unseen, the labelled trainval features and the unlabelled test_unseen
features), asks its subclass to fit its classifiers at the start of every evaluation (``fit_classifiers``), and
accumulates one confusion matrix per task. The matrices are torchmetrics states, summed over DDP ranks, so a
sharded evaluation gives exactly the single-process numbers.

**No model selection on test labels.** xlsa17 has no validation images of the unseen classes; the official code
keeps the best epoch by test accuracy (for the GAN and for the classifier), which reads the test labels. Here the
run's result is the last epoch's (``test/`` after ``fit``); the official best-over-epochs figure is logged too, as
``val/*_oracle_best``, and named for what it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from zoo.predict import PredictionWriter, write_csv

__all__ = ["per_class_accuracy", "harmonic_mean", "ZeroShotModule", "ZSLPredictionWriter"]


def per_class_accuracy(confusion: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Mean over ``classes`` (those with test images) of ``confusion[c, c] / confusion[c].sum()``; rows are targets."""
    rows = confusion[classes].double()
    support = rows.sum(1)
    hits = rows.gather(1, classes.view(-1, 1)).squeeze(1)
    present = support > 0
    if not present.any():
        return torch.zeros((), dtype=torch.float64)
    return (hits[present] / support[present]).mean()


def harmonic_mean(seen: torch.Tensor | float, unseen: torch.Tensor | float) -> torch.Tensor:
    """GZSL's H = 2SU / (S + U), 0 when S + U is 0."""
    seen, unseen = torch.as_tensor(seen, dtype=torch.float64), torch.as_tensor(unseen, dtype=torch.float64)
    total = seen + unseen
    return torch.where(total > 0, 2 * seen * unseen / total.clamp_min(1e-12), torch.zeros_like(total))


class ZeroShotModule(L.LightningModule):
    """ZSL/GZSL evaluation over the ``ZSLFeatureDataModule`` contract; subclasses provide the classifiers.

    Subclasses implement ``fit_classifiers()`` (called at the start of every validation, test and predict, with the
    model in eval mode) and ``classify(features) -> (zsl_pred, gzsl_pred)``: global class ids, the first among the
    unseen classes only, the second among all classes.

    Args:
        gzsl: also score generalised zero-shot learning (U, S, H).
    """

    def __init__(self, *, gzsl: bool = True) -> None:
        super().__init__()
        self.gzsl = gzsl
        self.best: dict[str, float] = {}

    # ---- the data contract --------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise RuntimeError(f"{type(self).__name__} reads its classes and features from the datamodule; run it "
                               "with a datamodules.zsl.ZSLFeatureDataModule")
        datamodule.setup(stage)
        self.bind_data(datamodule)

    def bind_data(self, data: Any) -> None:
        """Take the tensors of a ``ZSLFeatureDataModule`` (or any object with the same attributes)."""
        self.attributes = data.attributes.float()
        self.seen_classes, self.unseen_classes = data.seen_classes.long(), data.unseen_classes.long()
        self.train_features, self.train_labels = data.train_features.float(), data.train_labels.long()
        self.unseen_features = data.unseen_features
        self.unseen_class_counts = data.unseen_class_counts.long()
        num_classes = len(self.attributes)
        self.check_dimensions(data.train_features.shape[1], self.attributes.shape[1], num_classes)
        if not hasattr(self, "confusion_zsl"):
            self.confusion_zsl = MulticlassConfusionMatrix(num_classes)
            self.confusion_gzsl = MulticlassConfusionMatrix(num_classes)
        self.confusion_zsl.to(self.device)
        self.confusion_gzsl.to(self.device)

    def check_dimensions(self, feature_dim: int, attribute_dim: int, num_classes: int) -> None:
        """Raise with the keys to set when the model was built for other feature or attribute sizes."""

    # ---- what a model provides -------------------------------------------------------------------------------

    def fit_classifiers(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define fit_classifiers()")

    def classify(self, features: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} must define classify()")

    # ---- evaluation: loader 0 = test_unseen, loader 1 = test_seen -----------------------------------------------

    def _begin_evaluation(self) -> None:
        self.confusion_zsl.reset()
        self.confusion_gzsl.reset()
        self.fit_classifiers()

    def on_validation_epoch_start(self) -> None:
        self._begin_evaluation()

    def on_test_epoch_start(self) -> None:
        self._begin_evaluation()

    def on_predict_epoch_start(self) -> None:
        self.fit_classifiers()

    def _evaluation_step(self, batch: Any, dataloader_idx: int) -> None:
        features, labels, _ = batch
        zsl_pred, gzsl_pred = self.classify(features.float())
        if dataloader_idx == 0:
            self.confusion_zsl.update(zsl_pred, labels)
        if gzsl_pred is not None:
            self.confusion_gzsl.update(gzsl_pred, labels)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, dataloader_idx)

    def scores(self) -> dict[str, torch.Tensor]:
        """ZSL accuracy and, with ``gzsl``, U, S and H, from the accumulated (rank-summed) confusion matrices."""
        zsl = self.confusion_zsl.compute()
        out = {"zsl_acc": per_class_accuracy(zsl, self.unseen_classes.to(zsl.device))}
        if self.gzsl:
            gzsl = self.confusion_gzsl.compute()
            unseen = per_class_accuracy(gzsl, self.unseen_classes.to(gzsl.device))
            seen = per_class_accuracy(gzsl, self.seen_classes.to(gzsl.device))
            out.update(gzsl_U=unseen, gzsl_S=seen, gzsl_H=harmonic_mean(seen, unseen))
        return {k: v.float() for k, v in out.items()}

    def _log_scores(self, stage: str) -> dict[str, torch.Tensor]:
        scores = self.scores()
        for name, value in scores.items():
            self.log(f"{stage}/{name}", value, prog_bar=name in ("zsl_acc", "gzsl_H"), sync_dist=False)
        return scores

    def on_validation_epoch_end(self) -> None:
        scores = self._log_scores("val")
        if self.trainer.sanity_checking:
            return
        for name, value in scores.items():  # the official protocol: the best epoch by test accuracy (oracle)
            self.best[name] = max(self.best.get(name, 0.0), float(value))
            self.log(f"val/{name}_oracle_best", self.best[name])

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        features, labels, index = batch
        zsl_pred, gzsl_pred = self.classify(features.float())
        return {"index": index, "label": labels, "zsl_pred": zsl_pred,
                "gzsl_pred": gzsl_pred if gzsl_pred is not None else torch.full_like(zsl_pred, -1)}

    def prediction_writer(self) -> "ZSLPredictionWriter":
        return ZSLPredictionWriter()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["zsl_oracle_best"] = dict(self.best)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.best = dict(checkpoint.get("zsl_oracle_best", {}))


class ZSLPredictionWriter(PredictionWriter):
    """``predictions.csv``: split (test_unseen / test_seen), index in that split, label, the ZSL prediction (among
    the unseen classes; test_unseen only) and the GZSL prediction (among all classes), with class names when the
    data has them."""

    def rows(self, outputs: Any, batch: Any, dataloader_idx: int, folder: Path, trainer: "L.Trainer",
             pl_module: "L.LightningModule") -> list[tuple]:
        split = "test_unseen" if dataloader_idx == 0 else "test_seen"
        columns = [self.to_list(outputs[k]) for k in ("index", "label", "zsl_pred", "gzsl_pred")]
        return [(split, i, y, z if dataloader_idx == 0 else -1, g) for i, y, z, g in zip(*columns)]

    def finish(self, rows: list[tuple], folder: Path, trainer: "L.Trainer",
               pl_module: "L.LightningModule") -> list[Path]:
        names = list(getattr(getattr(trainer, "datamodule", None), "class_names", []) or [])

        def name(c: int) -> str:
            return names[c] if 0 <= c < len(names) else ""

        rows = sorted(rows, key=lambda row: (row[0] != "test_unseen", row[1]))
        out = [(s, i, y, name(y), z, name(z) if z >= 0 else "", g, name(g) if g >= 0 else "")
               for s, i, y, z, g in rows]
        return [write_csv(folder / "predictions.csv", ["split", "index", "label", "label_name", "zsl_pred",
                                                       "zsl_pred_name", "gzsl_pred", "gzsl_pred_name"], out)]
