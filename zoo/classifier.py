"""What every image classifier in the zoo shares: the head, the network, and the evaluation around them.

* ``ClassifierHead``: global average pooling → dropout → linear, ``(B, C, h, w) → (B, K)``; the form CAM is defined
  for.
* ``Classifier``: a feature-map backbone (``zoo.contracts.feature_channels``) followed by that head.
* ``ClassificationModule``: the LightningModule base that owns the accuracy metrics and the validation, test and
  predict steps. A paper implements ``__init__`` (its networks) and ``training_step``; ``forward(images)`` gives the
  logits that are evaluated (an EMA student, a teacher, the plain network). The reference classifier
  (``zoo.classification.classifier``), the semi-supervised classifiers (``zoo.semisup``) and API-Net
  (``zoo.finegrained``) build on it.
* ``ClassificationPredictionWriter``: what ``zoo predict`` writes for all of them, ``predictions.csv``.

Batches for evaluation are ``(images, labels, ...)``; ``predict`` takes those or the ``{"image", "path", "index", ...}``
batches of a ``predict_dir`` folder (``datamodules.base.ImageFileDataset``) and returns ``{"probs": (B, K), "preds":
(B,)}``. At the end of ``zoo test`` the test split's confusion matrix goes to ``<run>/tables/test_confusion_matrix.csv``
and, with a W&B logger, to W&B as the table ``test/confusion_matrix`` and the plot ``test/confusion_matrix_plot``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.utils.data import Subset
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from zoo.callbacks import log_table
from zoo.contracts import check_num_classes, feature_channels
from zoo.predict import PredictionWriter, write_csv

__all__ = ["ClassifierHead", "Classifier", "ClassificationModule", "ClassificationPredictionWriter", "class_names_of"]


def class_names_of(trainer: Optional["L.Trainer"], num_classes: int) -> list[str]:
    """The datamodule's ``class_names`` when it has one name per class, else ``[]`` (names unknown)."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    names = list(getattr(datamodule, "class_names", None) or [])
    return [str(name) for name in names] if len(names) == num_classes else []


class ClassifierHead(nn.Module):
    """Global average pooling → dropout → linear: ``(B, C, h, w) → (B, num_classes)``."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features.mean(dim=(2, 3))))

    def dense(self, features: torch.Tensor) -> torch.Tensor:
        """The linear layer applied at every position, as a 1 × 1 convolution: ``(B, C, h, w) → (B, K, h, w)``
        scores whose spatial mean is ``forward``'s logits in evaluation mode (a teacher's label map, ReLabel §3)."""
        return F.conv2d(features, self.fc.weight[:, :, None, None].to(features.dtype),
                        None if self.fc.bias is None else self.fc.bias.to(features.dtype))


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
    so exact over processes) for ``stage`` in ``val`` and ``test``; at the end of a test, the confusion matrix of the
    test split (a torchmetrics state too, so DDP sums it exactly) as a table (``log_test_confusion_matrix``).
    ``setup`` checks ``num_classes`` against the datamodule's. Subclasses call ``super().__init__(num_classes=...)``,
    build their networks, define ``forward`` and ``training_step``, and may override ``evaluation_loss`` (e.g. with
    label smoothing). ``zoo predict`` writes ``predictions.csv`` with ``ClassificationPredictionWriter``.
    """

    def __init__(self, *, num_classes: int) -> None:
        super().__init__()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # Not in state_dict (torchmetrics states are not persistent): checkpoints stay as they were.
        self.test_confusion = MulticlassConfusionMatrix(num_classes)

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
        if stage == "test":
            self.test_confusion.update(logits, labels)
        return logits

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluation_step(batch, "test")

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def on_test_epoch_end(self) -> None:
        self.log_test_confusion_matrix(self.test_confusion.compute())  # compute() sums the ranks' counts
        self.test_confusion.reset()

    def log_test_confusion_matrix(self, matrix: torch.Tensor) -> None:
        """The test split's confusion matrix ``(K, K)`` (rows: true class, columns: predicted class, counts) as
        ``<run>/tables/test_confusion_matrix.csv`` and, with a W&B logger, the W&B table ``test/confusion_matrix``
        and W&B's own confusion-matrix plot ``test/confusion_matrix_plot``. Every rank calls it; rank 0 writes."""
        if not self.trainer.is_global_zero:
            return
        counts = matrix.long().cpu()
        num_classes = counts.shape[0]
        names = class_names_of(self.trainer, num_classes) or [str(c) for c in range(num_classes)]
        log_table(self.trainer, "test/confusion_matrix", ["true_class", *names],
                  [[name, *row] for name, row in zip(names, counts.tolist())])
        wandb_loggers = [logger for logger in self.trainer.loggers if isinstance(logger, WandbLogger)]
        if wandb_loggers and counts.sum() > 0:
            import wandb  # noqa: PLC0415

            # W&B's plot wants one (true, predicted) pair per image: the counts expand into exactly those pairs.
            flat = counts.flatten()
            cells = torch.repeat_interleave(torch.arange(len(flat)), flat)
            plot = wandb.plot.confusion_matrix(y_true=(cells // num_classes).tolist(),
                                               preds=(cells % num_classes).tolist(), class_names=names,
                                               title="test confusion matrix")
            for logger in wandb_loggers:
                logger.experiment.log({"test/confusion_matrix_plot": plot, "trainer/global_step": self.global_step})

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Class probabilities of a test-split batch ``(images, labels, ...)``, a ``predict_dir`` batch
        ``{"image", ...}`` or a bare image tensor: ``{"probs": (B, K), "preds": (B,)}``."""
        if isinstance(batch, dict):
            images = batch["image"]
        elif isinstance(batch, (list, tuple)):
            images = batch[0]
        else:
            images = batch
        probs = self(images).float().softmax(-1)
        return {"probs": probs, "preds": probs.argmax(-1)}

    def prediction_writer(self) -> "ClassificationPredictionWriter":
        """What ``zoo predict`` writes: ``predictions.csv`` (``ClassificationPredictionWriter``)."""
        return ClassificationPredictionWriter()


def _item_files(dataset: Any) -> Optional[list[str]]:
    """The file of every item of a dataset that reads files (an ``ImageFolder``, a ``FineGrainedDataset``, an
    ``ImageFileDataset``, or a ``Subset`` of one), by item index; ``None`` for in-memory data."""
    if isinstance(dataset, Subset):
        files = _item_files(dataset.dataset)
        return None if files is None else [files[i] for i in dataset.indices]
    if hasattr(dataset, "samples"):  # torchvision's ImageFolder / DatasetFolder: (path, class) pairs
        return [str(path) for path, _ in dataset.samples]
    if hasattr(dataset, "files"):
        return [str(path) for path in dataset.files]
    return None


class _Prediction(NamedTuple):
    """One image's prediction, as the writer collects it on every rank."""

    loader: int  # the predict dataloader's index
    index: int  # the item's index in its dataset
    path: Optional[str]  # the file, when the batch names it
    top_classes: list[int]  # the most probable classes, most probable first
    top_prob: float  # the probability of top_classes[0]
    label: Optional[int]  # the true class, when the batch has one


class ClassificationPredictionWriter(PredictionWriter):
    """``predictions.csv``: one row per image, in dataset order, gathered over DDP ranks.

    Columns: ``path`` (the image file; for an in-memory test split, the item's index in the split), ``pred`` (class
    index), ``pred_name`` (its name when the datamodule has ``class_names``, else empty), ``prob`` (the softmax
    probability of ``pred``), ``top5`` (the ``min(5, K)`` most probable class indices, space-separated, most probable
    first) and, when the batches carry labels (the test split), ``label``: the accuracy is then the share of rows with
    ``pred == label``.

    An item's index comes from a ``predict_dir`` batch's ``"index"``; for a test-split batch it is the position in the
    rank's shard, mapped back with ``ZooDataModule.eval_loader``'s rule (rank ``r`` of ``w`` reads items
    ``r, r + w, ...``).

    Args:
        output_dir: see ``PredictionWriter``.
        top_k: how many classes the ``top5`` column lists at most.
    """

    def __init__(self, output_dir: Optional[str] = None, top_k: int = 5) -> None:
        super().__init__(output_dir)
        self.top_k = top_k
        self._seen: dict[int, int] = {}

    def on_predict_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        super().on_predict_start(trainer, pl_module)
        self._seen = {}

    def rows(self, outputs: Any, batch: Any, dataloader_idx: int, folder: Path, trainer: "L.Trainer",
             pl_module: "L.LightningModule") -> list[_Prediction]:
        probs = outputs["probs"].detach().float()
        size = len(probs)
        if isinstance(batch, dict):
            indices, paths, labels = self.to_list(batch["index"]), list(batch["path"]), [None] * size
        else:
            start = self._seen.get(dataloader_idx, 0)
            indices = (trainer.global_rank + trainer.world_size * torch.arange(start, start + size)).tolist()
            paths = [None] * size
            has_labels = isinstance(batch, (list, tuple)) and len(batch) > 1
            labels = self.to_list(batch[1]) if has_labels else [None] * size
        self._seen[dataloader_idx] = self._seen.get(dataloader_idx, 0) + size
        top_probs, top_classes = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        return [_Prediction(dataloader_idx, index, path, classes, prob[0], label)
                for index, path, classes, prob, label in zip(indices, paths, top_classes.cpu().tolist(),
                                                             top_probs.cpu().tolist(), labels)]

    def finish(self, rows: list[_Prediction], folder: Path, trainer: "L.Trainer",
               pl_module: "L.LightningModule") -> list[Path]:
        rows = sorted(rows, key=lambda row: (row.loader, row.index))
        confusion = getattr(pl_module, "test_confusion", None)  # a ClassificationModule; else the model says
        num_classes = int(confusion.num_classes if confusion is not None else pl_module.num_classes)
        names = class_names_of(trainer, num_classes)
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        # Under DDP rank 0's loader reads its shard, a Subset of the whole split, whose files the indices refer to.
        files = [_item_files(loader.dataset.dataset if trainer.world_size > 1 and isinstance(loader.dataset, Subset)
                             else loader.dataset) for loader in loaders]
        labelled = [row for row in rows if row.label is not None]
        header = ["path", "pred", "pred_name", "prob", "top5", *(["label"] if labelled else [])]
        table = []
        for row in rows:
            path = row.path
            if path is None:
                known = files[row.loader] if row.loader < len(files) else None
                path = known[row.index] if known is not None else row.index
            pred = row.top_classes[0]
            table.append([path, pred, names[pred] if names else "", float(row.top_prob),
                          " ".join(map(str, row.top_classes)),
                          *([row.label if row.label is not None else ""] if labelled else [])])
        written = [write_csv(folder / "predictions.csv", header, table)]
        if labelled:
            accuracy = sum(row.top_classes[0] == row.label for row in labelled) / len(labelled)
            print(f"[zoo] predict: accuracy {accuracy:.4f} over the {len(labelled)} labelled images", flush=True)
        return written
