"""Stage 2 of weakly supervised segmentation: a segmentation network trained on exported pseudo masks.

WSSS papers report two numbers: the quality of the pseudo masks on the training images (``zoo.wsss.ppc``'s seed
mIoU), and the val mIoU of a fully supervised segmentation network trained on those masks as if they were labels.
The PPC repository trains DeepLab v1 (LargeFOV) and v2 (ASPP) on ResNet-38/101 for that (``segmentation/`` of
https://github.com/usr922/wseg); the zoo's ``DeepLabV2`` is the v2 head — parallel 3×3 atrous convolutions at rates
(6, 12, 18, 24) whose class scores are summed — on any feature backbone (DeepLab: "Semantic Image Segmentation with
Deep Convolutional Nets, Atrous Convolution, and Fully Connected CRFs", L.-C. Chen et al., TPAMI 2017,
https://arxiv.org/abs/1606.00915, §3.1-3.2). CRF post-processing is left out.

The masks come from ``zoo predict`` of a PPC checkpoint (VOC-palette PNGs named by image id); the datamodule reads
them for training with ``data.pseudo_mask_dir`` and the ground truth only for evaluation. Pointing
``pseudo_mask_dir`` at the ground-truth masks gives the fully supervised upper bound.

```bibtex
@article{chen2017deeplab,
  title={DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous Convolution, and Fully
         Connected CRFs},
  author={Chen, Liang-Chieh and Papandreou, George and Kokkinos, Iasonas and Murphy, Kevin and Yuille, Alan L},
  journal={TPAMI}, year={2017}
}
```
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

from zoo.predict import PredictionWriter
from zoo.schedules import poly
from zoo.wsss.evaluation import MaskWriter

__all__ = ["ASPPHead", "DeepLabV2"]


class ASPPHead(nn.Module):
    """DeepLab v2's ASPP-L: one 3×3 convolution per atrous rate straight to class scores, summed (§3.2)."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r) for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return sum(branch(features) for branch in self.branches)


class DeepLabV2(L.LightningModule):
    """A segmentation network (backbone + ASPP) trained with cross-entropy on (pseudo) masks, 255 ignored.

    Batches (``datamodules.wsss`` with ``pseudo_mask_dir``): ``{"image", "mask"}`` for training; evaluation as for
    ``PPC``. Validation loader 0 (the training images with ground truth) gives ``val/train_miou``, loader 1 (val)
    ``val/miou``; test gives ``test/miou``. mIoU averages every class, background included, as VOC's ``eval.py``.

    Args:
        backbone: a feature backbone (list of maps, the last used), ``out_channels`` listing their widths.
        num_classes: foreground classes (the network predicts ``num_classes + 1``).
        rates: the ASPP rates ((6, 12, 18, 24) at output stride 8).
        lr, momentum, weight_decay, optimizer, poly_power: SGD with poly decay (DeepLab's); the head at 10× lr.
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 20, rates: Sequence[int] = (6, 12, 18, 24),
                 lr: float = 2.5e-4, momentum: float = 0.9, weight_decay: float = 5e-4,
                 optimizer: Literal["sgd", "adamw"] = "sgd", poly_power: float = 0.9,
                 ignore_index: int = 255) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = backbone
        self.head = ASPPHead(list(backbone.out_channels)[-1], num_classes + 1, rates)
        self.metrics = nn.ModuleList(MulticlassJaccardIndex(num_classes + 1, average="none", ignore_index=ignore_index)
                                     for _ in range(2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(images)[-1])
        return F.interpolate(logits, images.shape[-2:], mode="bilinear", align_corners=False)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["image"]).float(), batch["mask"].long(),
                               ignore_index=self.hparams.ignore_index)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(batch["image"]))
        return loss

    def predict_masks(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).argmax(1)

    def panel_outputs(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        return None, self.predict_masks(images)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.metrics[min(dataloader_idx, 1)].update(self.predict_masks(batch["image"]), batch["mask"].long())

    def _log_miou(self, names: Sequence[str]) -> None:
        for metric, name in zip(self.metrics, names):
            if metric.update_count:
                self.log(name, metric.compute().mean())  # all classes, absent ones counting 0 (VOC's eval.py)
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_miou(["val/train_miou", "val/miou"])

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.metrics[0].update(self.predict_masks(batch["image"]), batch["mask"].long())

    def on_test_epoch_end(self) -> None:
        self._log_miou(["test/miou"])

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return {"name": list(batch["name"]), "mask": self.predict_masks(batch["image"]).to(torch.uint8)}

    def prediction_writer(self) -> PredictionWriter:
        return MaskWriter()

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        head = list(self.head.parameters())
        groups = [{"params": list(self.backbone.parameters()), "lr": hp.lr},
                  {"params": head, "lr": 10 * hp.lr}]
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {hp.optimizer!r}")
        max_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(max_steps) or max_steps <= 0:
            raise ValueError("the poly schedule needs a finite number of steps: set trainer.max_epochs or max_steps")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: poly(step, int(max_steps), hp.poly_power))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
