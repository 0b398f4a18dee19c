"""What the fine-grained runs show on the dashboard: API-Net's mined pairs with their gates."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid

from zoo.callbacks import ImageLogger, log_images

__all__ = ["PairLogger"]


class PairLogger(ImageLogger):
    """Logs the pairs API-Net mines in the first training batch of an epoch, every ``every_n_epochs`` epochs and in
    the last (``zoo.callbacks.ImageLogger``'s cadence).

    One row per anchor image: the anchor, its nearest same-class partner, its nearest other-class partner. Each
    caption gives the classes, the mean gate value of each image of the pair and ``p_self − p_other`` (how much its
    own gate beats its partner's for the true class), computed in eval mode on that batch. Images go to W&B (or
    TensorBoard, or a PNG under the run's root dir without a logger).

    Args:
        num_anchors: rows shown.
        every_n_epochs: logging period.
    """

    after_validation = after_test = False

    def __init__(self, num_anchors: int = 6, every_n_epochs: int = 5) -> None:
        super().__init__(every_n_epochs)
        self.num_anchors = num_anchors
        self._batch: Any = None

    @rank_zero_only
    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx == 0 and self.should_draw(trainer):
            self._batch = batch
            self.draw_in_eval_mode(trainer, pl_module, "train")
            self._batch = None

    def draw(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if not hasattr(pl_module, "pair_forward"):
            raise TypeError(f"PairLogger needs a model with `pair_forward` (API-Net), got {type(pl_module).__name__}")
        images, labels = self._batch[0], self._batch[1]
        out = pl_module.pair_forward(images, labels)

        # Pair i joins first[i] and second[i]; its margin entry i is the first image's p_self − p_other.
        same_class = labels[out["first"]] == labels[out["second"]]
        intra, inter = {}, {}
        for i, (a, b, same) in enumerate(zip(out["first"].tolist(), out["second"].tolist(), same_class.tolist())):
            (intra if same else inter)[a] = (b, i)
        anchors = [a for a in intra if a in inter][: self.num_anchors]
        if not anchors:
            return
        denormalize = getattr(trainer.datamodule, "denormalize", None)
        shown = images.float()
        shown = denormalize(shown) if denormalize is not None else shown.clamp(0, 1)
        shown = shown.expand(-1, 3, -1, -1) if shown.shape[1] == 1 else shown

        margin, gate1, gate2 = out["p_self_minus_other"], out["gate1"], out["gate2"]
        rows, captions = [], []
        for a in anchors:
            (b_same, i_same), (b_other, i_other) = intra[a], inter[a]
            rows += [shown[a], shown[b_same], shown[b_other]]
            captions.append(
                f"anchor {a} (class {int(labels[a])}) | same {b_same}: gates {gate1[i_same].mean():.2f}/"
                f"{gate2[i_same].mean():.2f}, p_self−p_other {margin[i_same]:+.2f} | other {b_other} "
                f"(class {int(labels[b_other])}): gates {gate1[i_other].mean():.2f}/{gate2[i_other].mean():.2f}, "
                f"p_self−p_other {margin[i_other]:+.2f}"
            )
        grid = make_grid(torch.stack(rows).cpu(), nrow=3, padding=2, pad_value=1.0)
        log_images(trainer, f"{stage}/pairs", grid.unsqueeze(0), ["rows: anchor | nearest same class | nearest other "
                   "class; " + " || ".join(captions)], png_name=f"pairs/epoch{trainer.current_epoch:03d}.png")
