"""Class Activation Mapping (CAM).

Paper: "Learning Deep Features for Discriminative Localization", B. Zhou, A. Khosla, A. Lapedriza, A. Oliva,
A. Torralba, CVPR 2016 (https://arxiv.org/abs/1512.04150). Official code: https://github.com/zhoubolei/CAM

For a network that ends in global average pooling (GAP) and a linear layer, the class-``c`` logit is
``y_c = Σ_k w_ck · mean_xy f_k(x, y) + b_c``. Moving the sum inside the mean gives the class activation map
``M_c(x, y) = Σ_k w_ck f_k(x, y)`` (paper, Eq. 2), so ``mean_xy M_c = y_c - b_c``: the map says where the evidence for
class ``c`` lies, at the resolution of the last feature map. Any zoo model exposing
``class_activation_maps(images) -> (logits, cams)`` gets CAM overlays logged by ``CAMLogger``.

```bibtex
@inproceedings{zhou2016cam,
  title={Learning Deep Features for Discriminative Localization},
  author={Zhou, Bolei and Khosla, Aditya and Lapedriza, Agata and Oliva, Aude and Torralba, Antonio},
  booktitle={CVPR}, year={2016}
}
```
"""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F

from zoo.callbacks import ImageLogger, log_images

__all__ = ["class_activation_maps", "normalize_maps", "colorize", "overlay_maps", "CAMLogger"]


def class_activation_maps(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CAM of every class (Zhou et al. 2016, Eq. 2).

    Args:
        features: last feature maps ``(B, C, h, w)``, before global average pooling.
        weight: the linear classifier's weight ``(K, C)``.

    Returns:
        ``(B, K, h, w)`` maps ``M_k = Σ_c weight[k, c] · features[:, c]``; their spatial mean is logit minus bias.
    """
    return torch.einsum("bchw,kc->bkhw", features, weight.to(features.dtype))


def normalize_maps(maps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Min-max normalise each map of ``(..., h, w)`` to [0, 1] independently."""
    flat = maps.flatten(-2)
    low, high = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(eps)).view_as(maps)


def colorize(heat: torch.Tensor) -> torch.Tensor:
    """A jet-like colour map: ``(B, H, W)`` in [0, 1] → ``(B, 3, H, W)`` RGB (blue = low, red = high)."""
    x = heat.clamp(0, 1).unsqueeze(1)
    centres = heat.new_tensor([3.0, 2.0, 1.0]).view(1, 3, 1, 1)  # red, green, blue peaks at x = 3/4, 1/2, 1/4
    return (1.5 - (4 * x - centres).abs()).clamp(0, 1)


def overlay_maps(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend coloured maps onto images.

    Args:
        images: ``(B, 1|3, H, W)`` in [0, 1].
        maps: ``(B, h, w)`` at any resolution; upsampled bilinearly to ``H × W`` and min-max normalised per image.
        alpha: weight of the heat map.

    Returns:
        ``(B, 3, H, W)`` in [0, 1].
    """
    maps = F.interpolate(maps.unsqueeze(1).float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
    heat = colorize(normalize_maps(maps.squeeze(1)))
    images = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
    return (1 - alpha) * images + alpha * heat


class CAMLogger(ImageLogger):
    """Logs CAM overlays of a fixed set of validation images after validation, every ``every_n_epochs`` epochs and
    after the last (``zoo.callbacks.ImageLogger``'s cadence).

    The images are the first ``num_images`` of the datamodule's ``val_set`` (or of the first validation batch), the
    same every epoch, so the maps can be watched sharpening. Each overlay shows the CAM of the predicted class, with
    the true label, prediction and its probability as caption. W&B gets an image list (``val/cam``), TensorBoard an
    image grid; with any other logger (or none) a PNG grid is written to ``<default_root_dir>/cam/``.

    The model must provide ``class_activation_maps(images) -> (logits (B, K), maps (B, K, h, w))``.

    Args:
        num_images: how many validation images to follow.
        every_n_epochs: logging period in training epochs.
        display_size: overlays are upscaled (nearest) to at least this many pixels per side for viewing.
    """

    after_test = False

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1, display_size: int = 128) -> None:
        super().__init__(every_n_epochs)
        self.num_images, self.display_size = num_images, display_size
        self._images: Optional[torch.Tensor] = None
        self._labels: Optional[torch.Tensor] = None

    def _fixed_batch(self, trainer: "L.Trainer") -> tuple[torch.Tensor, torch.Tensor]:
        if self._images is None:
            dataset = getattr(trainer.datamodule, "val_set", None) if trainer.datamodule is not None else None
            if dataset is not None:
                items = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
                images = torch.stack([torch.as_tensor(x) for x, _ in items])
                labels = torch.as_tensor([int(y) for _, y in items])
            else:
                images, labels = next(iter(trainer.val_dataloaders))[:2]
                images, labels = images[: self.num_images], labels[: self.num_images]
            self._images, self._labels = images, labels
        return self._images, self._labels

    def draw(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        images, labels = self._fixed_batch(trainer)
        logits, maps = pl_module.class_activation_maps(images.to(pl_module.device))
        probs = logits.float().softmax(-1)
        preds = probs.argmax(-1)
        pred_maps = maps[torch.arange(len(preds), device=maps.device), preds]  # (B, h, w)
        shown = images.to(pred_maps.device)
        denormalize = getattr(trainer.datamodule, "denormalize", None)
        shown = denormalize(shown) if denormalize is not None else normalize_maps(shown)
        overlays = overlay_maps(shown, pred_maps).cpu()
        scale = max(1, self.display_size // overlays.shape[-1])
        overlays = F.interpolate(overlays, scale_factor=scale, mode="nearest") if scale > 1 else overlays
        names = getattr(trainer.datamodule, "class_names", None) or [str(i) for i in range(logits.shape[-1])]
        captions = [
            f"label {names[int(t)]} / pred {names[int(p)]} ({float(probs[i, p]):.2f})"
            for i, (t, p) in enumerate(zip(labels.tolist(), preds.tolist()))
        ]
        log_images(trainer, f"{stage}/cam", overlays, captions, png_name=f"cam/epoch={trainer.current_epoch:03d}.png")
