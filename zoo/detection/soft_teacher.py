"""Soft Teacher: End-to-End Semi-Supervised Object Detection with Soft Teacher.

Xu, Zhang, Hu, Wang, Wang, Wei, Bai & Liu, ICCV 2021, https://arxiv.org/abs/2106.09018; official code
https://github.com/microsoft/SoftTeacher (``ssod/models/soft_teacher.py``, mmdetection 2.16), whose choices are
followed where they differ from the paper.

Each step sees labelled images and unlabelled ones (1 : 4). An EMA of the student (``zoo.ema.EMATeacher``, momentum
``min(0.999, 1 − 1/(t + 1))``, parameters only: the backbone's BN is frozen) detects on a weakly augmented view; its
boxes with score > 0.5 are moved into the student's strongly augmented view through the views' matrices
(``zoo.detection.boxes``: ``T_strong · T_weak⁻¹``, four corners, min/max, clip), and the student learns from them:

* RPN and RoI classification on the pseudo boxes scoring > 0.9. The RoI classification is "soft": a student
  proposal sampled as background is mapped back to the weak view, the teacher's box head scores it, and its
  cross-entropy is weighted by the teacher's background probability (positives weigh 1); the sum is divided by
  ``max(Σ w, 1)`` (the code's normaliser; §3.2 of the paper writes another).
* RoI regression on the boxes whose teacher refinements agree (§3.3, "box jittering"): each box is jittered 10 times
  by N(0, (0.06 · w or h)²) per coordinate, the teacher's class-specific regression refines every copy, and the box
  is kept when the mean over coordinates of std / (w or h) is below 0.02. No score gate beyond the initial 0.5.
* L = L_sup + α · (L_rpn + L_cls + L_reg) with α = 4.

Departures: an image without any pseudo box adds nothing to the unsupervised losses (the official code trains it as
all background; a young teacher's misses would then be taught as background), so a batch without pseudo boxes has
zero unsupervised gradient. Evaluation reports the teacher (``val/map``, as the paper) and the student
(``val/student/map``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import nn
from torchvision.ops import box_iou
from torchvision.utils import draw_bounding_boxes

from zoo.callbacks import log_images
from zoo.checkpoint import drop_module_hyperparameters
from zoo.detection.base import ImageSizes
from zoo.detection.boxes import transform_boxes, view_to_view
from zoo.detection.evaluation import DetectionMetrics
from zoo.detection.faster_rcnn import FasterRCNN, TwoStageNetwork, roi_losses
from zoo.ema import EMATeacher

__all__ = ["jitter_boxes", "box_uncertainty", "background_weights", "soft_classification_loss",
           "pseudo_box_quality", "PseudoBoxes", "SoftTeacher"]

Targets = list[dict[str, torch.Tensor]]


def jitter_boxes(boxes: torch.Tensor, copies: int = 10, scale: float = 0.06,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``boxes (N, 4)`` → ``(copies, N, 4)``: each coordinate offset by N(0, (scale · side)²), the side being the box's
    width for x and height for y (at least 1 px), as the official ``aug_box``."""
    sides = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1).repeat(1, 2)
    noise = torch.randn((copies,) + tuple(boxes.shape), generator=generator, device=boxes.device, dtype=boxes.dtype)
    return boxes[None] + noise * (scale * sides)[None]


def box_uncertainty(refined: torch.Tensor) -> torch.Tensor:
    """The teacher's refinements of the jittered copies ``(copies, N, 4)`` → uncertainty ``(N,)``: the std over the
    copies of each coordinate, divided by the mean box's width (x) or height (y, at least 1 px), averaged over the
    four coordinates (§3.3)."""
    mean = refined.mean(dim=0)
    sides = (mean[:, 2:] - mean[:, :2]).clamp(min=1).repeat(1, 2)
    return (refined.std(dim=0) / sides).mean(dim=1)


def background_weights(labels: torch.Tensor, teacher_background: torch.Tensor) -> torch.Tensor:
    """Per-RoI weights of the soft classification loss: the teacher's background probability for RoIs sampled as
    background (label 0), 1 for foreground ones (Eq. 2; the official code sets the negatives' label weights)."""
    return torch.where(labels == 0, teacher_background.to(torch.float32), torch.ones_like(teacher_background,
                                                                                          dtype=torch.float32))


def soft_classification_loss(cross_entropy: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ w · CE / max(Σ w, 1)`` (the official normaliser)."""
    return (weights * cross_entropy).sum() / weights.sum().clamp(min=1.0)


def pseudo_box_quality(boxes: torch.Tensor, labels: torch.Tensor, image: torch.Tensor, true_boxes: torch.Tensor,
                       true_labels: torch.Tensor, true_image: torch.Tensor, iou: float = 0.5) -> torch.Tensor:
    """``[correct pseudo boxes, pseudo boxes, found true boxes, true boxes]`` (float64): a pseudo box is correct when a
    true box of its image and class overlaps it at IoU ≥ ``iou``; a true box is found when a pseudo box does."""
    if len(boxes) and len(true_boxes):
        match = ((box_iou(boxes.float(), true_boxes.float()) >= iou) & (image[:, None] == true_image[None])
                 & (labels[:, None] == true_labels[None]))
        correct, found = match.any(dim=1).sum(), match.any(dim=0).sum()
    else:
        correct = found = torch.zeros((), device=boxes.device)
    return torch.stack([correct.double(), torch.tensor(float(len(boxes)), device=boxes.device, dtype=torch.float64),
                        found.double(), torch.tensor(float(len(true_boxes)), device=boxes.device, dtype=torch.float64)])


def _draw(canvas: torch.Tensor, boxes: torch.Tensor, color: str) -> torch.Tensor:
    return draw_bounding_boxes(canvas, boxes.detach().cpu().float(), colors=color, width=1) if len(boxes) else canvas


class PseudoBoxes(NamedTuple):
    """The teacher's boxes on a batch of weak views, concatenated over images."""

    boxes: torch.Tensor  # (N, 4) in the weak view
    scores: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,) 0..C-1
    image: torch.Tensor  # (N,) index in the batch
    uncertainty: torch.Tensor  # (N,) box_uncertainty (0 without jittering)
    features: dict  # the teacher's pyramid on the weak views (it scores the student's proposals later)
    sizes: ImageSizes  # the weak views' (h, w)


class SoftTeacher(FasterRCNN):
    """Soft Teacher on the zoo's Faster R-CNN (see the module docstring).

    Start it from a supervised checkpoint (``--finetune.init_from runs/faster_rcnn_.../last.ckpt``): the teacher is
    copied from the student at the first training step, so it starts from those weights too (the official advice
    when the unsupervised losses stay at 0 on small data, SoftTeacher#117/#206).

    Args:
        unsup_weight: α (4; 2 in the fully labelled setting).
        ema_momentum: the teacher's ``m`` (0.999), ramped as ``min(m, 1 − 1/(t + 1))``.
        ema_buffers: also average the BN running statistics (for a trunk trained with live BN; the paper freezes BN,
            so only parameters are averaged).
        pseudo_threshold: teacher detections kept as pseudo boxes (0.5).
        rpn_threshold, cls_threshold: pseudo boxes for the RPN and the RoI classification (0.9).
        jitter_copies, jitter_scale, uncertainty_threshold: box jittering (10, 0.06, 0.02).
        background_weighting: the soft background weights (off: plain mean cross-entropy, the paper's ablation).
        box_jittering: select regression boxes by uncertainty (off: by ``cls_threshold`` score, the paper's
            baseline).
        panel_every_n_epochs: cadence of the ``train/pseudo_boxes`` image panel (weak view with the teacher's boxes,
            strong view with the mapped ones); 0: none.
        **kwargs: ``FasterRCNN`` arguments.
    """

    def __init__(self, *, unsup_weight: float = 4.0, ema_momentum: float = 0.999, ema_buffers: bool = False,
                 pseudo_threshold: float = 0.5, rpn_threshold: float = 0.9, cls_threshold: float = 0.9,
                 jitter_copies: int = 10, jitter_scale: float = 0.06, uncertainty_threshold: float = 0.02,
                 background_weighting: bool = True, box_jittering: bool = True, panel_every_n_epochs: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        self.teacher = EMATeacher(self.detector, ema_momentum, ramp=True, include_buffers=ema_buffers)
        voc07 = self.hparams.voc07_metric
        self.student_val_metrics = DetectionMetrics(voc07=voc07)
        self.student_test_metrics = DetectionMetrics(voc07=voc07)
        # [correct pseudo boxes, pseudo boxes, found true boxes, true boxes] at cls_threshold, per stage
        self.register_buffer("pseudo_counts", torch.zeros(3, 4, dtype=torch.float64), persistent=False)

    ddp_find_unused_parameters = True  # an image without pseudo boxes leaves parts of the graph idle

    @property
    def teacher_network(self) -> TwoStageNetwork:
        return self.teacher.module

    # --- the teacher ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def pseudo_label(self, weak: list[torch.Tensor]) -> PseudoBoxes:
        """The teacher's detections on the weak views above ``pseudo_threshold``, with their jitter uncertainty."""
        hp, teacher = self.hparams, self.teacher_network
        teacher.eval()
        pixels, sizes = self.preprocess(weak)
        features = teacher.features(pixels)
        detections = teacher.detect(pixels, sizes, features)
        keep = [d["scores"] > hp.pseudo_threshold for d in detections]
        boxes = torch.cat([d["boxes"][k] for d, k in zip(detections, keep)])
        scores = torch.cat([d["scores"][k] for d, k in zip(detections, keep)])
        labels = torch.cat([d["labels"][k] for d, k in zip(detections, keep)])
        counts = torch.stack([k.sum() for k in keep])
        image = torch.repeat_interleave(torch.arange(len(weak), device=boxes.device), counts)
        uncertainty = torch.zeros_like(scores)
        if hp.box_jittering and len(boxes):
            uncertainty = self.jitter_uncertainty(features, sizes, boxes, labels, image, counts)
        return PseudoBoxes(boxes, scores, labels, image, uncertainty, features, sizes)

    @torch.no_grad()
    def jitter_uncertainty(self, features: dict, sizes: ImageSizes, boxes: torch.Tensor, labels: torch.Tensor,
                           image: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``box_uncertainty`` of the teacher's refinements of ``jitter_copies`` jittered copies of every box (one
        box-head pass over all copies of all images)."""
        hp, teacher = self.hparams, self.teacher_network
        copies = hp.jitter_copies
        jittered = jitter_boxes(boxes, copies, hp.jitter_scale).transpose(0, 1)  # (N, copies, 4), grouped by image
        per_image = list(jittered.reshape(-1, 4).split((counts * copies).tolist()))
        _, deltas = teacher.box_outputs(features, per_image, sizes)
        refined = teacher.decode(deltas, per_image).view(len(boxes), copies, -1, 4)
        refined = refined[torch.arange(len(boxes), device=boxes.device), :, labels + 1]  # the box's class
        limits = torch.tensor(sizes, device=boxes.device, dtype=refined.dtype)[image].flip(-1).repeat(1, 2)[:, None]
        refined = torch.minimum(refined.clamp(min=0), limits)  # clipped to the image, as the teacher's test output
        return box_uncertainty(refined.transpose(0, 1))

    # --- the student's unsupervised losses --------------------------------------------------------------------------
    @staticmethod
    def _targets(boxes: torch.Tensor, labels: torch.Tensor, image: torch.Tensor, mask: torch.Tensor,
                 num_images: int) -> tuple[Targets, list[int]]:
        """Per-image targets of the boxes in ``mask`` and the images that have at least one."""
        counts = torch.bincount(image[mask], minlength=num_images).tolist()
        targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes[mask].split(counts), labels[mask].split(counts))]
        return targets, [i for i, c in enumerate(counts) if c]

    def _sample_images(self, proposals: list[torch.Tensor], targets: Targets, images: list[int]
                       ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """RoI sampling on ``images`` only; the others get no RoI. Returns per image RoIs, and concatenated labels and
        regression targets."""
        rois, labels, regression = self.detector.sample([proposals[i] for i in images], [targets[i] for i in images])
        per_image = [proposals[0].new_zeros(0, 4) for _ in proposals]
        for i, r in zip(images, rois):
            per_image[i] = r
        return per_image, torch.cat(labels), torch.cat(regression)

    def unsupervised_losses(self, strong: list[torch.Tensor], infos: list[dict[str, torch.Tensor]],
                            pseudo: PseudoBoxes) -> dict[str, torch.Tensor]:
        """The student's RPN, soft classification and regression losses on the strong views (unweighted by α)."""
        hp, student = self.hparams, self.detector
        pixels, sizes = self.preprocess(strong)
        device, num_images = pixels.device, len(strong)
        weak_matrices = torch.stack([i["weak_matrix"] for i in infos]).to(device)
        strong_matrices = torch.stack([i["strong_matrix"] for i in infos]).to(device)
        strong_sizes = torch.tensor(sizes, device=device)
        boxes = transform_boxes(pseudo.boxes, view_to_view(weak_matrices, strong_matrices)[pseudo.image],
                                strong_sizes[pseudo.image])
        visible = (boxes[:, 2] - boxes[:, 0] > 1e-3) & (boxes[:, 3] - boxes[:, 1] > 1e-3)

        features = student.features(pixels)
        rpn_out = student.propose(features, pixels, sizes)
        rpn_targets, rpn_images = self._targets(boxes, pseudo.labels, pseudo.image,
                                                visible & (pseudo.scores > hp.rpn_threshold), num_images)
        losses = student.rpn_losses(rpn_out, rpn_targets, rpn_images)

        # Classification: pseudo boxes > cls_threshold; background RoIs weighted by the teacher's background score.
        cls_targets, cls_images = self._targets(boxes, pseudo.labels, pseudo.image,
                                                visible & (pseudo.scores > hp.cls_threshold), num_images)
        if cls_images:
            rois, labels, _ = self._sample_images(rpn_out.proposals, cls_targets, cls_images)
            logits, deltas = student.box_outputs(features, rois, sizes)
            with torch.autocast(device.type, enabled=False):
                ce, _ = roi_losses(logits, deltas, labels, torch.zeros(len(labels), 4, device=device))
                weights = torch.ones_like(ce)
                if hp.background_weighting:
                    weights = background_weights(labels, self.teacher_background(rois, infos, pseudo))
                losses["loss_cls"] = soft_classification_loss(ce, weights)
        else:
            losses["loss_cls"] = pixels.new_zeros(())

        # Regression: pseudo boxes whose jittered refinements agree (or, without jittering, the confident ones).
        reliable = (pseudo.uncertainty < hp.uncertainty_threshold) if hp.box_jittering \
            else (pseudo.scores > hp.cls_threshold)
        reg_targets, reg_images = self._targets(boxes, pseudo.labels, pseudo.image, visible & reliable, num_images)
        if reg_images:
            rois, labels, regression = self._sample_images(rpn_out.proposals, reg_targets, reg_images)
            logits, deltas = student.box_outputs(features, rois, sizes)
            with torch.autocast(device.type, enabled=False):
                _, box = roi_losses(logits, deltas, labels, regression)
                losses["loss_box"] = box.sum() / max(len(box), 1)
        else:
            losses["loss_box"] = pixels.new_zeros(())
        return {f"unsup_{k}": v for k, v in losses.items()}

    @torch.no_grad()
    def teacher_background(self, rois: list[torch.Tensor], infos: list[dict[str, torch.Tensor]],
                           pseudo: PseudoBoxes) -> torch.Tensor:
        """The teacher's background probability of the student's RoIs, mapped back to the weak view (clipped)."""
        device = rois[0].device
        weak_matrices = torch.stack([i["weak_matrix"] for i in infos]).to(device)
        strong_matrices = torch.stack([i["strong_matrix"] for i in infos]).to(device)
        counts = torch.tensor([len(r) for r in rois], device=device)
        image = torch.repeat_interleave(torch.arange(len(rois), device=device), counts)
        weak_sizes = torch.tensor(pseudo.sizes, device=device)
        to_weak = view_to_view(strong_matrices, weak_matrices)
        mapped = transform_boxes(torch.cat(rois), to_weak[image], weak_sizes[image])
        logits, _ = self.teacher_network.box_outputs(pseudo.features, list(mapped.split(counts.tolist())),
                                                     pseudo.sizes)
        return logits.float().softmax(dim=1)[:, 0]

    # --- training -------------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if int(self.teacher.num_updates) == 0:  # a fresh run (also after finetune.init_from): the teacher starts equal
            self.teacher.module.load_state_dict(self.detector.state_dict())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        labeled_images, labeled_targets = batch["labeled"]
        weak, strong, infos = batch["unlabeled"]
        pixels, sizes = self.preprocess(labeled_images)
        supervised = self.detector.supervised_losses(pixels, sizes, self.training_targets(labeled_targets))
        pseudo = self.pseudo_label(weak)
        unsupervised = self.unsupervised_losses(strong, infos, pseudo)
        loss = sum(supervised.values()) + self.hparams.unsup_weight * sum(unsupervised.values())

        confident = pseudo.scores > self.hparams.cls_threshold
        self._count_pseudo_boxes(0, pseudo.boxes[confident], pseudo.labels[confident], pseudo.image[confident], infos)
        logs = {f"train/{k}": v.detach() for k, v in {**supervised, **unsupervised}.items()}
        logs["train/pseudo_boxes_per_image"] = confident.sum().float() / len(weak)
        hp = self.hparams
        reliable = (pseudo.uncertainty < hp.uncertainty_threshold) if hp.box_jittering else confident
        logs["train/reliable_boxes_per_image"] = reliable.sum().float() / len(weak)
        logs["train/ema_momentum"] = torch.tensor(self.teacher.current_momentum())
        self.log_dict(logs, batch_size=len(weak))
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(weak))
        every = self.hparams.panel_every_n_epochs
        if every and batch_idx == 0 and self.current_epoch % every == 0 and self._trainer is not None \
                and self.trainer.is_global_zero:
            self._pseudo_box_panel(weak, strong, infos, pseudo)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.teacher.update(self.detector)

    def _count_pseudo_boxes(self, stage: int, boxes: torch.Tensor, labels: torch.Tensor, image: torch.Tensor,
                            truths: list[dict[str, torch.Tensor]]) -> None:
        """Accumulate ``pseudo_box_quality`` against the hidden boxes (images without labels are left out)."""
        labelled = torch.tensor([bool(t.get("has_labels", True)) for t in truths], device=boxes.device)
        true_counts = torch.tensor([len(t["boxes"]) for t in truths], device=boxes.device)
        true_image = torch.repeat_interleave(torch.arange(len(truths), device=boxes.device), true_counts)
        true_boxes = torch.cat([t["boxes"].to(boxes.device).float().reshape(-1, 4) for t in truths])
        true_labels = torch.cat([t["labels"].to(boxes.device) for t in truths])
        if "iscrowd" in truths[0]:
            keep = ~torch.cat([t["iscrowd"].to(boxes.device).bool() for t in truths])
            true_boxes, true_labels, true_image = true_boxes[keep], true_labels[keep], true_image[keep]
        mine, theirs = labelled[image], labelled[true_image]
        self.pseudo_counts[stage] += pseudo_box_quality(boxes[mine], labels[mine], image[mine], true_boxes[theirs],
                                                        true_labels[theirs], true_image[theirs])

    def _log_pseudo_quality(self, stage: int, prefix: str) -> None:
        counts = self.trainer.strategy.reduce(self.pseudo_counts[stage].clone(), reduce_op="sum")
        self.pseudo_counts[stage].zero_()
        if counts[1] > 0 or counts[3] > 0:
            self.log_dict({f"{prefix}/pseudo_precision": (counts[0] / counts[1].clamp(min=1)).float(),
                           f"{prefix}/pseudo_recall": (counts[2] / counts[3].clamp(min=1)).float()}, sync_dist=False)

    def on_train_epoch_end(self) -> None:
        self._log_pseudo_quality(0, "train")

    def _pseudo_box_panel(self, weak: list[torch.Tensor], strong: list[torch.Tensor], infos: list[dict],
                          pseudo: PseudoBoxes, count: int = 4) -> None:
        """Weak views with the teacher's boxes > cls_threshold (red) and the hidden ones (green); strong views with the
        mapped boxes (red)."""
        confident = pseudo.scores > self.hparams.cls_threshold
        drawn, captions = [], []
        for i in range(min(count, len(weak))):
            mine = confident & (pseudo.image == i)
            matrix = view_to_view(infos[i]["weak_matrix"][None], infos[i]["strong_matrix"][None]).to(weak[i].device)
            size = torch.tensor([strong[i].shape[-2:]], device=weak[i].device)
            mapped = transform_boxes(pseudo.boxes[mine], matrix.expand(int(mine.sum()), 3, 3),
                                     size.expand(int(mine.sum()), 2))
            weak_canvas = _draw((weak[i].cpu().clamp(0, 1) * 255).to(torch.uint8), infos[i]["boxes"], "lime")
            weak_canvas = _draw(weak_canvas, pseudo.boxes[mine], "red")
            strong_canvas = _draw((strong[i].cpu().clamp(0, 1) * 255).to(torch.uint8), mapped, "red")
            drawn += [weak_canvas.float() / 255, strong_canvas.float() / 255]
            captions += [f"weak view, image {int(infos[i]['image_id'])}: {int(mine.sum())} teacher boxes",
                         "strong view: the same boxes mapped"]
        height, width = max(x.shape[1] for x in drawn), max(x.shape[2] for x in drawn)
        grid = torch.stack([nn.functional.pad(x, (0, width - x.shape[2], 0, height - x.shape[1])) for x in drawn])
        log_images(self.trainer, "train/pseudo_boxes", grid, captions,
                   png_name=f"pseudo_boxes/epoch{self.current_epoch:03d}.png", nrow=2)

    # --- evaluation: teacher and student ----------------------------------------------------------------------------
    def detect(self, images: torch.Tensor, image_sizes: ImageSizes) -> list[dict[str, torch.Tensor]]:
        """The teacher's detections (the paper evaluates the teacher)."""
        self.teacher_network.eval()
        return self.teacher_network.detect(images, image_sizes)

    def _evaluate_both(self, batch: Any, teacher_metrics: DetectionMetrics, student_metrics: DetectionMetrics,
                       stage: int) -> None:
        images, targets = batch
        pixels, sizes = self.preprocess(images)
        teacher = self.detect(pixels, sizes)
        student = self.detector.detect(pixels, sizes)
        boxes, labels, image = [], [], []
        for i, det in enumerate(teacher):
            keep = det["scores"] > self.hparams.cls_threshold
            boxes.append(det["boxes"][keep])
            labels.append(det["labels"][keep])
            image.append(torch.full((int(keep.sum()),), i, device=pixels.device))
        self._count_pseudo_boxes(stage, torch.cat(boxes), torch.cat(labels), torch.cat(image), targets)
        originals = [{"boxes": self._to_original(t["boxes"], size, t["orig_size"]), "labels": t["labels"],
                      "iscrowd": t["iscrowd"], "image_id": t["image_id"]} for size, t in zip(sizes, targets)]
        for detections, metrics in ((teacher, teacher_metrics), (student, student_metrics)):
            for det, size, t in zip(detections, sizes, targets):
                det["boxes"] = self._to_original(det["boxes"], size, t["orig_size"])
            metrics.update(detections, originals)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate_both(batch, self.val_metrics, self.student_val_metrics, 1)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate_both(batch, self.test_metrics, self.student_test_metrics, 2)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_metrics(self.student_val_metrics, "val/student")
        self._log_pseudo_quality(1, "val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_metrics(self.student_test_metrics, "test/student")
        self._log_pseudo_quality(2, "test")
