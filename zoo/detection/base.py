"""What every detector here shares: the batch contract, normalisation and padding, the optimiser and schedule the
papers use, and evaluation (COCO mAP, optionally VOC07 AP) in the original image coordinates.

Batches are ``(images, targets)`` as ``datamodules.detection`` yields them: a list of ``(3, H, W)`` images in
[0, 1] and a list of dicts with ``boxes (N, 4)`` xyxy in pixels, ``labels (N,)`` in ``0..C-1``, ``iscrowd (N,)``,
``image_id`` and ``orig_size (h, w)``. Crowd (COCO) and difficult (VOC) boxes are dropped from training and ignored
by the evaluation. A subclass implements ``compute_losses`` and ``detect``.

``zoo test`` also sends a per-class AP table (``test/per_class_ap``) to W&B and ``<run>/tables/``; ``zoo predict``
writes a COCO ``results.json`` and drawn images through ``zoo.detection.predict.DetectionPredictionWriter``, on the
test split or on a folder of one's own images (``data.init_args.predict_dir``).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchvision.ops import batched_nms, clip_boxes_to_image

from zoo.callbacks import log_table
from zoo.contracts import check_num_classes
from zoo.detection.evaluation import DetectionMetrics
from zoo.detection.predict import DetectionPredictionWriter
from zoo.schedules import warmup_multistep
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["DetectionModule", "select_detections"]

ImageSizes = list[tuple[int, int]]


def select_detections(scores: torch.Tensor, boxes: torch.Tensor, num_per_level: list[int], image_size: tuple[int, int],
                      score_threshold: float, candidates_per_level: int, nms_threshold: float,
                      max_detections: int) -> dict[str, torch.Tensor]:
    """One image's dense outputs → final detections, as RetinaNet/ATSS/GFL do at test time.

    ``scores (A, C)`` (probabilities), ``boxes (A, 4)`` decoded: per level, the ``candidates_per_level`` best
    (anchor, class) pairs above ``score_threshold``; boxes clipped to the image; class-wise NMS; the
    ``max_detections`` best kept. Returns ``{"boxes", "scores", "labels"}``.
    """
    kept_boxes, kept_scores, kept_labels = [], [], []
    for level_scores, level_boxes in zip(scores.split(num_per_level), boxes.split(num_per_level)):
        flat = level_scores.flatten()
        k = min(candidates_per_level, len(flat))
        top_scores, top = flat.topk(k)
        keep = top_scores > score_threshold
        top_scores, top = top_scores[keep], top[keep]
        anchor, label = top // scores.shape[1], top % scores.shape[1]
        kept_boxes.append(level_boxes[anchor])
        kept_scores.append(top_scores)
        kept_labels.append(label)
    boxes_ = clip_boxes_to_image(torch.cat(kept_boxes), image_size)
    scores_, labels_ = torch.cat(kept_scores), torch.cat(kept_labels)
    keep = batched_nms(boxes_.float(), scores_.float(), labels_, nms_threshold)[:max_detections]
    return {"boxes": boxes_[keep].float(), "scores": scores_[keep].float(), "labels": labels_[keep]}


class DetectionModule(L.LightningModule):
    """Base of the zoo's detectors.

    Args:
        num_classes: foreground classes; must match the datamodule's ``num_classes``.
        image_mean, image_std: normalisation applied inside the model (ImageNet's by default).
        size_divisible: the padded batch is a multiple of this (the largest FPN stride).
        optimizer: ``sgd`` (the papers: momentum 0.9) or ``adamw`` (used for from-scratch training on the
            embedded set).
        lr, momentum, weight_decay: optimiser settings.
        bias_lr_factor: learning-rate multiplier of biases (ATSS/FCOS: 2, no weight decay on biases).
        warmup_iters, warmup_factor: linear warm-up from ``warmup_factor · lr`` over the first iterations.
        lr_milestones: fractions of the total training steps where the lr is multiplied by ``lr_gamma`` (the 1×
            schedule's epochs 8 and 11 of 12 are ``[0.667, 0.917]``).
        score_threshold, nms_threshold, max_detections, candidates_per_level: test-time selection.
        voc07_metric: also report ``voc07_map50`` (VOC2007 11-point AP@0.5, the R-FCN paper's metric).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        size_divisible: int = 32,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        bias_lr_factor: float = 1.0,
        warmup_iters: int = 500,
        warmup_factor: float = 1 / 3,
        lr_milestones: Sequence[float] = (8 / 12, 11 / 12),
        lr_gamma: float = 0.1,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.6,
        max_detections: int = 100,
        candidates_per_level: int = 1000,
        voc07_metric: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.val_metrics = DetectionMetrics(voc07=voc07_metric)
        # Per-class AP at test only: read off the same COCO evaluation, it adds the copy of its IoU and precision
        # arrays (about +70 % evaluation time on a 500-image, 80-class set), once per test.
        self.test_metrics = DetectionMetrics(voc07=voc07_metric, per_class=True)

    # --- what a detector implements -------------------------------------------------------------------------------
    def compute_losses(self, images: torch.Tensor, image_sizes: ImageSizes,
                       targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Padded normalised ``images (B, 3, H, W)``, the true ``(h, w)`` of each, training targets → named losses."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_losses")

    def detect(self, images: torch.Tensor, image_sizes: ImageSizes) -> list[dict[str, torch.Tensor]]:
        """Padded normalised images → per image ``{"boxes" (D, 4), "scores" (D,), "labels" (D,)}`` in its pixels."""
        raise NotImplementedError(f"{type(self).__name__} must implement detect")

    # --- shared machinery -----------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        check_num_classes(self)

    def preprocess(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, ImageSizes]:
        """Normalise each image and zero-pad (the mean colour) the batch to a multiple of ``size_divisible``."""
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        d = self.hparams.size_divisible
        height = -(-max(h for h, _ in sizes) // d) * d
        width = -(-max(w for _, w in sizes) // d) * d
        batch = torch.stack([F.pad((im - self.image_mean) / self.image_std, (0, width - w, 0, height - h))
                             for im, (h, w) in zip(images, sizes)])
        return batch, sizes

    @staticmethod
    def training_targets(targets: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Targets without their crowd / difficult boxes (the papers train on the others only)."""
        out = []
        for t in targets:
            keep = ~t["iscrowd"].bool() if "iscrowd" in t else torch.ones_like(t["labels"], dtype=torch.bool)
            out.append({"boxes": t["boxes"][keep].float(), "labels": t["labels"][keep]})
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        pixels, sizes = self.preprocess(images)
        losses = self.compute_losses(pixels, sizes, self.training_targets(targets))
        loss = sum(losses.values())
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=len(images))
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(images))
        return loss

    @staticmethod
    def _to_original(boxes: torch.Tensor, size: tuple[int, int], orig_size: torch.Tensor) -> torch.Tensor:
        ratio_h, ratio_w = float(orig_size[0]) / size[0], float(orig_size[1]) / size[1]
        return boxes * boxes.new_tensor([ratio_w, ratio_h, ratio_w, ratio_h])

    @torch.no_grad()
    def predict_images(self, images: list[torch.Tensor], orig_sizes: Optional[list[torch.Tensor]] = None
                       ) -> list[dict[str, torch.Tensor]]:
        """Detections for raw ``(3, H, W)`` images in [0, 1], in the coordinates of ``orig_sizes`` when given."""
        pixels, sizes = self.preprocess(images)
        detections = self.detect(pixels, sizes)
        if orig_sizes is not None:
            for det, size, orig in zip(detections, sizes, orig_sizes):
                det["boxes"] = self._to_original(det["boxes"], size, orig)
        return detections

    def _evaluate(self, batch: Any, metrics: DetectionMetrics) -> None:
        images, targets = batch
        detections = self.predict_images(images, [t["orig_size"] for t in targets])
        originals = [{"boxes": self._to_original(t["boxes"], tuple(im.shape[-2:]), t["orig_size"]), "labels": t["labels"],
                      "iscrowd": t["iscrowd"], "image_id": t["image_id"]} for im, t in zip(images, targets)]
        metrics.update(detections, originals)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def _log_metrics(self, metrics: DetectionMetrics, stage: str) -> None:
        results = dict(metrics.compute())
        metrics.reset()
        per_class = results.pop("per_class", None)
        self.log(f"{stage}/map", results.pop("map"), prog_bar=True)
        self.log_dict({f"{stage}/{k}": v for k, v in results.items()})
        if per_class is not None and self._trainer is not None and self.trainer.is_global_zero:
            log_table(self.trainer, f"{stage}/per_class_ap", *self.per_class_table(per_class))

    def class_names_and_ids(self) -> tuple[list[str], list[int]]:
        """The datamodule's class names and dataset category ids (``"0".."C-1"`` and ``1..C`` without one, e.g. a
        COCO config predicting on a folder with no COCO annotation file to read the categories from)."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        count = self.hparams.num_classes
        try:
            names = list(getattr(datamodule, "class_names", None) or [])
            ids = list(getattr(datamodule, "category_ids", None) or [])
        except FileNotFoundError as err:  # datamodules' DatasetNotFoundError: no annotation file to read
            rank_zero_warn(f"class names and category ids unknown ({err}); labels are written as category ids 1..{count}"
                           f" and named '0'..'{count - 1}'")
            names, ids = [], []
        return names or [str(i) for i in range(count)], ids or list(range(1, count + 1))

    def per_class_table(self, per_class: torch.Tensor) -> tuple[list[str], list[list]]:
        """``DetectionMetrics``' per-class rows as a table with one row per class ``0..C-1``: columns ``class_id``
        (the model's label), ``category_id`` (the dataset's), ``class_name``, ``AP``, ``AP50``, ``AP75`` and
        ``gt_boxes`` (non-crowd, non-difficult). The AP cells are empty (``None``) for a class without ground truth:
        COCOeval leaves it out of the mAP, so the mean of the filled ``AP`` cells is the logged ``map``."""
        names, ids = self.class_names_and_ids()
        count = self.hparams.num_classes
        values = torch.full((count, 4), float("nan"), dtype=torch.float64)
        values[:, 3] = 0
        per_class = per_class.detach().cpu().double()
        inside = (per_class[:, 0] >= 0) & (per_class[:, 0] < count)
        values[per_class[inside, 0].long()] = per_class[inside, 1:]
        rows = []
        for label, (ap, ap50, ap75, gt_boxes) in enumerate(values.tolist()):
            cells = [None if math.isnan(value) else value for value in (ap, ap50, ap75)]
            rows.append([label, ids[label] if label < len(ids) else label + 1,
                         names[label] if label < len(names) else str(label), *cells, int(gt_boxes)])
        return ["class_id", "category_id", "class_name", "AP", "AP50", "AP75", "gt_boxes"], rows

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, Any]]:
        """Per image ``{"boxes", "scores", "labels", "orig_size"}`` with the boxes in the pixels of the image file,
        and ``image_id`` (a test-split batch ``(images, targets)``) or ``path`` and ``index`` (a ``predict_dir``
        batch: ``datamodules.detection.image_file_collate``'s dict)."""
        if isinstance(batch, dict):
            sizes = list(batch["size"])
            detections = self.predict_images(list(batch["image"]), sizes)
            for det, path, index, size in zip(detections, batch["path"], batch["index"], sizes):
                det.update(path=path, index=int(index), orig_size=size)
            return detections
        images, targets = batch
        detections = self.predict_images(images, [t["orig_size"] for t in targets])
        for det, t in zip(detections, targets):
            det.update(image_id=t["image_id"], orig_size=t["orig_size"])
        return detections

    def prediction_writer(self) -> DetectionPredictionWriter:
        """``zoo predict``'s writer: COCO ``results.json`` and the first 16 images drawn (detections ≥ 0.3). Another
        number or threshold: name the writer under ``trainer.callbacks`` with its arguments."""
        return DetectionPredictionWriter()

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        weights, biases = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (biases if p.ndim <= 1 else weights).append(p)
        # Biases and norm parameters: no weight decay and, for ATSS/FCOS, twice the lr (maskrcnn-benchmark defaults).
        groups = [{"params": weights, "lr": hp.lr, "weight_decay": hp.weight_decay},
                  {"params": biases, "lr": hp.lr * hp.bias_lr_factor, "weight_decay": 0.0}]
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        milestones = [int(m * total) for m in hp.lr_milestones]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_multistep(
            step, milestones, hp.lr_gamma, hp.warmup_iters, hp.warmup_factor))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
