"""Evaluation of weakly supervised segmentation: pseudo masks from class maps, mIoU over a background-threshold sweep,
mask export for ``zoo predict`` and the dashboard panel.

The protocol is the one of SEAM / PPC (``eval.py`` of https://github.com/usr922/wseg): the normalised class maps of
the classes in the image label compete with a constant background score ``t``; a pixel takes the class of its
strongest map when that map exceeds ``t`` and background otherwise. ``IoU_c = TP / (T + P − TP)`` over the pixels
whose ground truth is not 255, averaged over all classes *including* background (a class absent from both the
ground truth and the prediction counts 0, as ``eval.py``'s ``+ 1e-10`` does). The official script sweeps
``t ∈ {0, 0.01, …, 0.59}`` and reports the best ("seed mIoU", measured on VOC train).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics import Metric

from zoo.callbacks import ImageLogger, log_images
from zoo.cam import overlay_maps
from zoo.predict import PredictionWriter, write_csv

__all__ = ["DEFAULT_THRESHOLDS", "masks_from_maps", "ThresholdSweepIoU", "MaskWriter", "SegmentationPanel",
           "colorize_masks"]

#: the official ``eval.py --curve`` sweep: background scores 0, 0.01, ..., 0.59
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(60))


def masks_from_maps(maps: torch.Tensor, bg_threshold: float) -> torch.Tensor:
    """Pseudo masks ``(N, H, W)`` from normalised foreground maps ``(N, K, H, W)`` (absent classes all 0).

    ``argmax([t, map_1, ..., map_K])``: class ``k + 1`` where the strongest map exceeds ``t``, else 0 (background); a
    tie goes to background, as ``np.argmax`` picks the first.
    """
    peak, arg = maps.max(1)
    return torch.where(peak > bg_threshold, arg + 1, torch.zeros_like(arg))


class ThresholdSweepIoU(Metric):
    """Confusion matrices of the pseudo masks at every background threshold at once (a torchmetrics ``Metric``: the
    ``(T, C, C)`` count state is summed over DDP ranks, so the mIoU is exactly the single-process one).

    A pixel whose strongest map is ``m`` with class ``k`` is predicted ``k`` at every threshold below ``m`` and
    background at the others, so one histogram over (number of thresholds below ``m``, truth, ``k``) and two
    cumulative sums give all ``T`` matrices: memory ``O(pixels)``, not ``O(T · pixels)``.

    Args:
        num_classes: classes including background (21 on VOC).
        thresholds: background scores, ascending.
        ignore_index: ground-truth value excluded from the counts.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                 ignore_index: int = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if list(thresholds) != sorted(thresholds) or not thresholds:
            raise ValueError(f"thresholds must be a non-empty ascending sequence, got {list(thresholds)}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.thresholds = [float(t) for t in thresholds]
        num_t = len(self.thresholds)
        self.add_state("confmat", torch.zeros(num_t, num_classes, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, maps: torch.Tensor, target: torch.Tensor) -> None:
        """``maps``: normalised foreground maps ``(N, C − 1, H, W)``; ``target``: ``(N, H, W)`` class ids, 0 = bg."""
        if maps.shape[1] != self.num_classes - 1 or maps.shape[-2:] != target.shape[-2:]:
            raise ValueError(f"maps {tuple(maps.shape)} must be (N, {self.num_classes - 1}, H, W) for targets "
                             f"{tuple(target.shape)}")
        peak, arg = maps.float().max(1)
        valid = target != self.ignore_index
        peak, arg, truth = peak[valid], arg[valid] + 1, target[valid].long()
        if truth.numel() and (int(truth.min()) < 0 or int(truth.max()) >= self.num_classes):
            raise ValueError(f"target holds class ids outside 0..{self.num_classes - 1} (and {self.ignore_index} = "
                             f"ignore): {sorted(set(truth.unique().tolist()) - set(range(self.num_classes)))}")
        c, num_t = self.num_classes, len(self.thresholds)
        thresholds = torch.tensor(self.thresholds, device=peak.device, dtype=peak.dtype)
        below = torch.searchsorted(thresholds, peak.contiguous(), right=False)  # how many thresholds are < peak
        fg = torch.bincount((below * c + truth) * c + arg, minlength=(num_t + 1) * c * c).view(num_t + 1, c, c)
        bg = torch.bincount(below * c + truth, minlength=(num_t + 1) * c).view(num_t + 1, c)
        # threshold i predicts the class for pixels with below > i and background for below <= i
        counts = fg.flip(0).cumsum(0).flip(0)[1:].clone()
        counts[:, :, 0] += bg.cumsum(0)[:num_t]
        self.confmat += counts

    def iou(self) -> torch.Tensor:
        """``(T, C)`` IoU per threshold and class (``eval.py``: TP / (T + P − TP + 1e-10))."""
        conf = self.confmat.double()
        tp = conf.diagonal(dim1=1, dim2=2)
        return tp / (conf.sum(2) + conf.sum(1) - tp + 1e-10)

    def compute(self) -> torch.Tensor:
        """``(T,)`` mIoU at every threshold (over all ``C`` classes)."""
        return self.iou().mean(1)

    def curve(self) -> torch.Tensor:
        """``(T,)`` mIoU per threshold, synchronised over ranks (``compute`` squeezes a single threshold to 0-d)."""
        return self.compute().reshape(-1)

    def best(self) -> tuple[float, float]:
        """``(best mIoU, its threshold)``; the first threshold wins a tie."""
        miou = self.curve()
        i = int(miou.argmax())
        return float(miou[i]), self.thresholds[i]

    def at(self, threshold: float) -> float:
        """mIoU at the swept threshold nearest to ``threshold``."""
        i = int(np.abs(np.asarray(self.thresholds) - threshold).argmin())
        return float(self.curve()[i])


def _palette(trainer: Optional["L.Trainer"]) -> np.ndarray:
    """The datamodule's ``palette`` (``(256, 3)`` uint8; VOC's colour map), else a grey ramp."""
    palette = getattr(getattr(trainer, "datamodule", None), "palette", None) if trainer is not None else None
    if palette is None:
        ramp = (np.arange(256) * 12 % 256).astype(np.uint8)
        return np.stack([ramp, ramp, ramp], 1)
    return np.asarray(palette, dtype=np.uint8).reshape(-1, 3)


def colorize_masks(masks: torch.Tensor, palette: np.ndarray) -> torch.Tensor:
    """``(N, H, W)`` class ids (255 = ignore) → ``(N, 3, H, W)`` RGB in [0, 1] through ``palette``."""
    table = torch.as_tensor(palette, dtype=torch.float32, device=masks.device) / 255.0
    return table[masks.long().clamp(0, len(table) - 1)].permute(0, 3, 1, 2)


class MaskWriter(PredictionWriter):
    """``zoo predict`` for segmentation: every predicted mask as an indexed PNG in the datamodule's palette (VOC's),
    named ``<id>.png`` as ``SegmentationClassAug`` is, so a folder of pseudo masks trains the stage-2 network
    (``data.pseudo_mask_dir``) or goes through VOC's own tools; plus ``predictions.csv`` (id, classes present).

    The model's ``predict_step`` returns ``{"name": [ids], "mask": (N, H, W) uint8}``.
    """

    def rows(self, outputs: Any, batch: Any, dataloader_idx: int, folder: Path, trainer: "L.Trainer",
             pl_module: "L.LightningModule") -> list[Any]:
        palette = _palette(trainer).flatten().tolist()
        rows = []
        for name, mask in zip(outputs["name"], outputs["mask"].cpu().numpy().astype(np.uint8)):
            image = Image.fromarray(mask, mode="P")
            image.putpalette(palette)
            image.save(folder / f"{name}.png")
            present = sorted(int(c) for c in np.unique(mask) if c not in (0, 255))
            rows.append((str(name), " ".join(map(str, present))))
        return rows

    def finish(self, rows: list[Any], folder: Path, trainer: "L.Trainer", pl_module: "L.LightningModule") -> list[Path]:
        return [write_csv(folder / "predictions.csv", ["id", "classes"], sorted(rows))]


class SegmentationPanel(ImageLogger):
    """Image | class map | predicted mask | ground truth, side by side, for the first ``num_images`` images of the
    last validation set (the same images every time), logged as ``<stage>/masks``.

    The model provides ``panel_outputs(images, labels) -> (maps (N, K, H, W) or None, masks (N, H, W))``: the CAM
    models show their strongest label-masked map and their pseudo mask, a segmentation network its class scores and
    prediction.
    """

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1, display_size: int = 96) -> None:
        super().__init__(every_n_epochs)
        self.num_images, self.display_size = num_images, display_size
        self._batch: Optional[dict[str, torch.Tensor]] = None

    def _fixed_batch(self, trainer: "L.Trainer") -> dict[str, torch.Tensor]:
        if self._batch is None:
            sets = trainer.datamodule.evaluation_sets("val")
            dataset = sets[-1] if isinstance(sets, (list, tuple)) else sets
            items = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
            size = items[0]["image"].shape[-2:]
            items = [item for item in items if item["image"].shape[-2:] == size]  # VOC: one size per panel
            self._batch = {key: torch.stack([torch.as_tensor(item[key]) for item in items])
                           for key in ("image", "labels", "mask")}
        return self._batch

    def draw(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        batch = self._fixed_batch(trainer)
        images = batch["image"].to(pl_module.device)
        maps, masks = pl_module.panel_outputs(images, batch["labels"].to(pl_module.device))
        denormalize = getattr(trainer.datamodule, "denormalize", None)
        shown = (denormalize(images) if denormalize is not None else images.clamp(0, 1)).float().cpu()
        shown = shown.expand(-1, 3, -1, -1) if shown.shape[1] == 1 else shown
        palette = _palette(trainer)
        columns = [shown]
        if maps is not None:
            columns.append(overlay_maps(shown, maps.max(1).values.cpu()))
        columns += [colorize_masks(masks.cpu(), palette), colorize_masks(batch["mask"], palette)]
        panel = torch.cat(columns, dim=-1)
        scale = max(1, self.display_size // panel.shape[-2])
        panel = F.interpolate(panel, scale_factor=scale, mode="nearest") if scale > 1 else panel
        names = getattr(trainer.datamodule, "class_names", None) or []
        captions = [" + ".join(names[i] if i < len(names) else str(i) for i in row.nonzero().flatten().tolist())
                    + " | image, map, prediction, truth" for row in batch["labels"]]
        log_images(trainer, f"{stage}/masks", panel.clamp(0, 1), captions,
                   png_name=f"masks/epoch={trainer.current_epoch:03d}.png", nrow=1)
