"""ReLabel: training on localized multi-labels pooled from a teacher's dense label map.

Paper: "Re-labeling ImageNet: from Single to Multi-Labels, from Global to Localized Labels", S. Yun, S. J. Oh,
B. Heo, D. Han, J. Choe, S. Chun, CVPR 2021 (https://arxiv.org/abs/2101.05022).
Official code: https://github.com/naver-ai/relabel_imagenet (read at 3d4824f: ``utils/relabel_functions.py``,
``utils/data_loader.py``, ``utils/loss.py``, ``utils/data_augment.py``, ``train.py``).

An ImageNet image often holds several objects, and a random crop often shows none of the labelled one. ReLabel runs a
strong teacher once over every training image with its global pooling removed and its classifier applied as a 1×1
convolution (§3), keeping the top-k class scores of each cell of a ``S × S`` grid (the "label map"). While training,
the label of a random crop is the label map RoI-aligned over the crop's box, then soft-maxed over the classes
(LabelPooling, §4, Alg. 1), and the student minimises the cross-entropy to that soft target.

What is where:

* ``label_map_from_scores`` / ``densify_label_maps``: the official on-disk form ``(2, k, S, S)`` (top-k scores, then
  their class indices as floats; issue naver-ai/relabel_imagenet#8) and back to ``(K, S, S)``, the other classes 0.
* ``LabelPooling``: the soft target of a batch of crop boxes (fractions of the original image), with ``label_mode``
  ``original`` (the dataset's one-hot label), ``global`` (the whole map pooled, the paper's "global" ablation row) and
  ``localized`` (the crop's box, the method).
* ``soft_target_cross_entropy`` and ``cutmix``: the loss and the CutMix variant that mixes images and soft targets.
* ``LabelMapWriter``: ``zoo predict`` with any zoo classifier checkpoint as the teacher writes one ``.pt`` label map
  per image, mirroring the image folder (``<class>/<stem>.pt``), so one's own data can be re-labelled.
* ``ReLabelClassifier`` (last): the reference ``ImageClassifier`` trained on those targets; validated and tested on
  the datasets' own single labels, as in the paper.

Where the zoo departs from the official code: the official ``get_relabel`` passes the crop box as
``(top, left, bottom, right)``, but ``torchvision.ops.roi_align`` reads ``(x1, y1, x2, y2)``, so it pools the box
mirrored about the diagonal (the map transposed). The zoo passes ``(left, top, right, bottom)``;
``tests/test_relabel.py`` checks it on a map whose left and right halves hold different classes. The −0.5 shift with
``aligned=False`` is kept (the maintainer's answer in issue #13): it puts the grid's cell centres at integer
coordinates, so the whole-image box averages every cell exactly.

```bibtex
@inproceedings{yun2021relabel,
  title={Re-labeling ImageNet: from Single to Multi-Labels, from Global to Localized Labels},
  author={Yun, Sangdoo and Oh, Seong Joon and Heo, Byeongho and Han, Dongyoon and Choe, Junsuk and Chun, Sanghyuk},
  booktitle={CVPR}, year={2021}
}
```
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align
from torchvision.utils import draw_bounding_boxes

from zoo.callbacks import ImageLogger, log_images
from zoo.classification.classifier import ImageClassifier
from zoo.classifier import ClassifierHead
from zoo.predict import PredictionWriter, write_csv

__all__ = [
    "label_map_from_scores", "densify_label_maps", "LabelPooling", "soft_target_cross_entropy", "cutmix",
    "dense_class_scores", "LabelMapWriter", "LabelPoolingLogger", "EitherLabelAccuracy", "ReLabelClassifier",
]

LabelMode = Literal["original", "global", "localized"]


# ---- the label map ---------------------------------------------------------------------------------------------------


def label_map_from_scores(scores: torch.Tensor, top_k: int = 5) -> torch.Tensor:
    """Dense class scores ``(B, K, h, w)`` → label maps ``(B, 2, top_k, h, w)`` in the official layout: ``[:, 0]`` the
    top-k scores of each cell, ``[:, 1]`` their class indices (as float32, as the released files store them)."""
    values, classes = scores.float().topk(top_k, dim=1)
    return torch.stack([values, classes.float()], dim=1)


def densify_label_maps(label_maps: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label maps ``(B, 2, k, h, w)`` → dense scores ``(B, num_classes, h, w)``: each cell's k scores scattered into
    their class channels, every other class 0 (as the official ``get_labelmaps``; the scores are pre-softmax, so
    0 is not "probability 0")."""
    scores, classes = label_maps[:, 0].float(), label_maps[:, 1].long()
    batch, _, height, width = scores.shape
    dense = scores.new_zeros(batch, num_classes, height, width)
    return dense.scatter_(1, classes, scores)


class LabelPooling(nn.Module):
    """The soft target of each crop (Yun et al. 2021, §4 "LabelPooling").

    ``forward(labels (B,), boxes (B, 4), label_maps (B, 2, k, h, w)) -> (B, K)`` probabilities:

    * ``localized``: RoIAlign of the densified map over the crop's box to ``1 × 1`` (the box as fractions
      ``(x1, y1, x2, y2)`` of the original image, scaled by the map's width and height, minus half a cell for
      ``aligned=False``), then softmax over the classes;
    * ``global``: the same over the whole image, whatever the crop (the paper's "global" label, Table 4);
    * ``original``: the one-hot dataset label (the baseline; the maps are ignored).

    A 1 × 1 output is the mean over the box, so a horizontal flip of the crop after cropping leaves it unchanged: the
    box needs no flipping (the official pipeline flips after cropping too). Runs without gradient, in float32 even
    under autocast (top-k scores of a large teacher can exceed what float16 holds after the softmax's shift).
    """

    def __init__(self, num_classes: int, label_mode: LabelMode = "localized") -> None:
        super().__init__()
        if label_mode not in ("original", "global", "localized"):
            raise ValueError(f"label_mode must be 'original', 'global' or 'localized', got {label_mode!r}")
        self.num_classes, self.label_mode = num_classes, label_mode

    @torch.no_grad()
    def forward(self, labels: torch.Tensor, boxes: Optional[torch.Tensor] = None,
                label_maps: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.label_mode == "original":
            return F.one_hot(labels.long(), self.num_classes).float()
        if boxes is None or label_maps is None:
            raise ValueError(f"label_mode {self.label_mode!r} needs the crop boxes and the label maps of the batch")
        if label_maps.dtype not in (torch.float32, torch.float64):
            # Class indices ride in the map as floats: 16-bit floats cannot hold indices above 256 (bf16) or 2048.
            raise TypeError(f"label maps must reach LabelPooling as float32, got {label_maps.dtype}: keep the batch in "
                            "float32 (precision 'bf16-mixed' / '16-mixed', not '*-true')")
        with torch.autocast(label_maps.device.type, enabled=False):
            dense = densify_label_maps(label_maps, self.num_classes)
            height, width = dense.shape[-2:]
            if self.label_mode == "global":
                boxes = boxes.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(len(dense), 4)
            scale = boxes.new_tensor([width, height, width, height], dtype=torch.float32)
            index = torch.arange(len(dense), device=dense.device, dtype=torch.float32)[:, None]
            rois = torch.cat([index, boxes.float() * scale - 0.5], dim=1)
            pooled = roi_align(dense, rois, output_size=1, spatial_scale=1.0, sampling_ratio=-1, aligned=False)
            return pooled.flatten(1).softmax(dim=1)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, label_mode={self.label_mode!r}"


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_b Σ_c −y_bc · log softmax(x_b)_c`` (the official ``SoftTargetCrossEntropy``): ``F.cross_entropy`` with
    class probabilities as the target, in float32."""
    return F.cross_entropy(logits.float(), targets.float())


def cutmix(images: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al. 2019) on images and soft targets: a box of another image of the batch (a random
    permutation) is pasted into each image; the targets mix as ``λ·y + (1 − λ)·y_perm`` with ``λ`` one minus the
    pasted share of the image, after the box is clipped to it (the official ``cutmix_batch``). Draws from torch's
    global generator (seeded by ``seed_everything``).

    Returns the mixed images (a new tensor), the mixed targets and ``λ``.
    """
    batch, _, height, width = images.shape
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    permutation = torch.randperm(batch).to(images.device)
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    mixed = images.clone()
    mixed[:, :, y1:y2, x1:x2] = images[permutation, :, y1:y2, x1:x2]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (height * width)
    return mixed, lam * targets + (1.0 - lam) * targets[permutation], lam


# ---- label maps from a zoo classifier --------------------------------------------------------------------------------


def _backbone_and_head(module: nn.Module) -> tuple[nn.Module, ClassifierHead]:
    """The feature-map backbone and the ``ClassifierHead`` of a zoo classifier: the module's own ``backbone`` and
    ``head`` (``ImageClassifier``, API-Net's backbone), or those of its first submodule that has both (a
    ``zoo.classifier.Classifier`` inside a semi-supervised module)."""
    for candidate in module.modules():
        backbone, head = getattr(candidate, "backbone", None), getattr(candidate, "head", None)
        if isinstance(backbone, nn.Module) and isinstance(head, ClassifierHead):
            return backbone, head
    raise TypeError(f"{type(module).__name__} has no `backbone` + `head` (zoo.classifier.ClassifierHead) to apply "
                    "densely: label maps need a classifier that ends in global average pooling and a linear layer")


def dense_class_scores(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The classifier without its global pooling, its linear layer applied as a 1 × 1 convolution (§3):
    ``(B, K, h, w)`` scores whose spatial mean is the model's logits."""
    backbone, head = _backbone_and_head(module)
    return head.dense(backbone(images))


class LabelMapWriter(PredictionWriter):
    """``zoo predict`` writes a label map per image: ``<output folder>/<path under predict_dir>.pt``, a float32 tensor
    ``(2, top_k, h, w)`` in the official layout, so a ``predict_dir`` of ``<class>/<image>`` files gives the
    ``<class>/<stem>.pt`` tree ``ReLabelImageFolderDataModule`` reads as ``label_maps``.

    Any zoo classifier checkpoint is a teacher (see ``dense_class_scores``). The images are read by the datamodule's
    ``predict_transform``: give ``ReLabelImageFolderDataModule`` a ``predict_size`` so that each whole image is
    resized (not centre-cropped; the crop boxes are fractions of the whole image). ``label_maps.csv`` lists the files.

    Args:
        output_dir: see ``PredictionWriter``.
        top_k: classes kept per cell (5 in the released ImageNet maps).
    """

    def __init__(self, output_dir: Optional[str] = None, top_k: int = 5) -> None:
        super().__init__(output_dir)
        self.top_k = top_k

    def rows(self, outputs: Any, batch: Any, dataloader_idx: int, folder: Path, trainer: "L.Trainer",
             pl_module: "L.LightningModule") -> list[tuple[str, str]]:
        if not isinstance(batch, dict):
            raise ValueError("LabelMapWriter writes label maps for a folder of images: pass "
                             "`--data.init_args.predict_dir <folder>` (e.g. the train/ tree to re-label)")
        maps = label_map_from_scores(dense_class_scores(pl_module, batch["image"]), self.top_k).cpu()
        root = Path(trainer.datamodule.predict_dir).expanduser().resolve()
        written = []
        for label_map, path in zip(maps, batch["path"]):
            relative = Path(path).resolve().relative_to(root).with_suffix(".pt")
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            torch.save(label_map.clone(), folder / relative)
            written.append((str(path), str(relative)))
        return written

    def finish(self, rows: list[tuple[str, str]], folder: Path, trainer: "L.Trainer",
               pl_module: "L.LightningModule") -> list[Path]:
        return [write_csv(folder / "label_maps.csv", ["image", "label_map"], sorted(rows))]


# ---- dashboards and extra metrics ------------------------------------------------------------------------------------


class LabelPoolingLogger(ImageLogger):
    """What the student is taught, for a fixed set of training images (evenly spaced through the set): each original image with its crop box drawn,
    captioned with the dataset label and the top classes of the model's target for that crop (the pooled soft label
    under ``localized``) (W&B ``train/label_pooling``, or
    ``<run>/relabel/epoch=NNN.png``).

    The datamodule's ``train_set`` must provide ``crop_example(index, seed) -> (original (C, H, W) in [0, 1], box (4,),
    label, label_map)`` (``datamodules.classification.LabelMapImageFolder`` does); the crop of each image is drawn
    from a fixed seed, so the pictures of different epochs are comparable.
    """

    after_test = False

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1, display_height: int = 96) -> None:
        super().__init__(every_n_epochs)
        self.num_images, self.display_height = num_images, display_height

    def draw(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        dataset = getattr(trainer.datamodule, "train_set", None)
        if dataset is None or not hasattr(dataset, "crop_example"):
            return
        # evenly spaced through the dataset: an ImageFolder is sorted by class, so the first items share one label
        chosen = torch.linspace(0, len(dataset) - 1, min(self.num_images, len(dataset))).round().long().tolist()
        examples = [dataset.crop_example(i, seed=i) for i in chosen]
        pictures, captions = [], []
        names = getattr(trainer.datamodule, "class_names", None) or []
        for original, box, label, label_map in examples:
            soft = pl_module.label_pooling(torch.tensor([label]), box[None], label_map[None])[0]
            top = soft.topk(min(3, len(soft)))
            shown = " ".join(f"{names[c] if names else c}:{p:.2f}" for p, c in zip(top.values.tolist(),
                                                                                  top.indices.tolist()))
            captions.append(f"label {names[label] if names else label} / taught {shown}")
            pictures.append(_draw_box(original, box, self.display_height))
        width = max(p.shape[-1] for p in pictures)
        pictures = [F.pad(p, (0, width - p.shape[-1])) for p in pictures]
        log_images(trainer, "train/label_pooling", torch.stack(pictures), captions,
                   png_name=f"relabel/epoch={trainer.current_epoch:03d}.png", nrow=1)


def _draw_box(image: torch.Tensor, box: torch.Tensor, height: int) -> torch.Tensor:
    """``image`` (C, H, W) in [0, 1] as RGB, upscaled to ``height`` rows, with the box (fractions) outlined in red."""
    rgb = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
    scale = max(1, height // rgb.shape[-2])
    rgb = F.interpolate(rgb[None].float(), scale_factor=scale, mode="nearest")[0]
    h, w = rgb.shape[-2:]
    pixels = (box * box.new_tensor([w, h, w, h])).round()[None]
    drawn = draw_bounding_boxes((rgb * 255).round().to(torch.uint8), pixels, colors="red", width=1)
    return drawn.float() / 255


class EitherLabelAccuracy(L.Callback):
    """At the end of ``test``: the share of images of the datamodule's ``either_label_test_set`` (items ``(image,
    label_a, label_b)``, e.g. whole two-object canvases) whose prediction is either label, logged as
    ``test/either_acc``. Each rank scores its shard; the counts are summed over ranks."""

    @torch.no_grad()
    def on_test_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "either_label_test_set", None)
        if dataset is None:
            return
        hits = torch.zeros(2, device=pl_module.device)
        for images, label_a, label_b in datamodule.eval_loader(dataset):
            preds = pl_module(images.to(pl_module.device)).argmax(-1).cpu()
            hits += torch.tensor([float(((preds == label_a) | (preds == label_b)).sum()), float(len(preds))],
                                 device=hits.device)
        if trainer.world_size > 1:
            hits = pl_module.all_gather(hits).sum(0)
        pl_module.log("test/either_acc", float(hits[0] / hits[1].clamp(min=1)), rank_zero_only=True)


# ---- the LightningModule ---------------------------------------------------------------------------------------------


class ReLabelClassifier(ImageClassifier):
    """``ImageClassifier`` (backbone → GAP → linear) trained on LabelPooling's soft targets.

    Training batches are ``(images, labels, boxes, label_maps)``: the crops, the datasets' single labels, the crop
    boxes ``(B, 4)`` as ``(x1, y1, x2, y2)`` fractions of the original images and the label maps ``(B, 2, k, h, w)``
    (``datamodules.classification.ReLabelImageFolderDataModule``). Validation, test and predict are the reference
    classifier's, on the single labels (the paper evaluates on ImageNet's own labels and on ReaL).

    Args:
        backbone, num_classes, dropout: see ``ImageClassifier``.
        label_mode: ``localized`` (ReLabel), ``global`` (the whole map's label for every crop) or ``original`` (the
            dataset label, one-hot): the paper's ablation (Table 4) from one switch.
        cutmix_prob: probability of CutMix per batch (1.0 in the official CutMix recipe; 0 disables it).
        cutmix_alpha: CutMix's Beta(α, α).
        cutmix_off_epochs: the last this many epochs train without CutMix (the official ``off_epoch``, 5).
    """

    def __init__(self, *, backbone: nn.Module, num_classes: int, dropout: float = 0.0,
                 label_mode: LabelMode = "localized", cutmix_prob: float = 0.0, cutmix_alpha: float = 1.0,
                 cutmix_off_epochs: int = 0) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, dropout=dropout)
        self.label_pooling = LabelPooling(num_classes, label_mode)
        self.cutmix_prob, self.cutmix_alpha, self.cutmix_off_epochs = cutmix_prob, cutmix_alpha, cutmix_off_epochs

    def use_cutmix(self) -> bool:
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        if max_epochs is not None and max_epochs > 0 and self.current_epoch >= max_epochs - self.cutmix_off_epochs:
            return False
        return self.cutmix_prob > 0 and float(torch.rand(())) < self.cutmix_prob

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels, boxes, label_maps = batch[:4]
        targets = self.label_pooling(labels, boxes, label_maps)
        if self.use_cutmix():
            images, targets, _ = cutmix(images, targets, self.cutmix_alpha)
        logits = self(images)
        loss = soft_target_cross_entropy(logits, targets)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        # How far the pooled targets move from the dataset labels: the share of crops whose top pooled class differs.
        self.log("train/relabelled", (targets.argmax(-1) != labels).float().mean(), on_step=False, on_epoch=True,
                 batch_size=len(labels))
        return loss
