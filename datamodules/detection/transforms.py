"""The ``(image, target)`` transforms of the detection sets and their collation.

Training resizes the shorter side to a size drawn from ``train_min_size`` (multi-scale when a list) with the longer
side capped at ``max_size``, then flips horizontally with ``flip_prob``; evaluation resizes the shorter side to
``min_size``. Both clamp the boxes to the image and drop the degenerate ones (together with their labels and
``iscrowd``). A resize to the size an image already has is skipped.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["ResizeShortestSide", "detection_transform", "image_transform", "detection_collate", "image_file_collate"]


def _shortest_side_size(height: int, width: int, min_size: int, max_size: Optional[int]) -> tuple[int, int]:
    """``(h, w)`` with the shorter side ``min_size`` and the longer one at most ``max_size`` (aspect kept, rounded)."""
    short, long = min(height, width), max(height, width)
    new_short, new_long = min_size, (2 * long * min_size + short) // (2 * short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = max(1, (2 * short * max_size + long) // (2 * long)), max_size
    return (new_short, new_long) if height <= width else (new_long, new_short)


class ResizeShortestSide(v2.Transform):
    """Resize so that the shorter side is ``min_size`` (drawn uniformly when a list) and the longer at most ``max_size``.

    ``RandomShortestSize`` / ``Resize(min_size, max_size=...)`` semantics, but exact (the shorter side is exactly
    ``min_size`` unless the cap applies; ``RandomShortestSize`` truncates ``h · r`` and can lose a pixel), allowing
    ``max_size == min_size``, and skipping the resize when the image already has the target size.
    """

    def __init__(self, min_size: int | Sequence[int], max_size: Optional[int] = None) -> None:
        super().__init__()
        self.min_size = [min_size] if isinstance(min_size, int) else [int(s) for s in min_size]
        if not self.min_size or min(self.min_size) < 1 or (max_size is not None and max_size < 1):
            raise ValueError(f"min_size must be positive int(s) and max_size positive, got {min_size}, {max_size}")
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        images = [x for x in flat_inputs if isinstance(x, (tv_tensors.Image, Image.Image)) or type(x) is torch.Tensor]
        if images:
            height, width = F.get_size(images[0])
        else:
            height, width = next(x.canvas_size for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes))
        choice = self.min_size[int(torch.randint(len(self.min_size), ()))] if len(self.min_size) > 1 else self.min_size[0]
        size = _shortest_side_size(height, width, choice, self.max_size)
        return {"size": None if size == (height, width) else list(size)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["size"] is None:
            return inpt
        return self._call_kernel(F.resize, inpt, size=params["size"], interpolation=v2.InterpolationMode.BILINEAR,
                                 antialias=True)


def _labels_and_crowd(inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``SanitizeBoundingBoxes``' labels getter: filter ``iscrowd`` alongside ``labels``."""
    target = inputs[1]
    return target["labels"], target["iscrowd"]


def detection_transform(train: bool, min_size: Optional[int | Sequence[int]] = None, max_size: Optional[int] = None,
                        flip_prob: float = 0.5) -> v2.Compose:
    """The ``(image, target)`` transform: resize (``min_size=None``: none), flip (training only), float in [0, 1],
    clamp the boxes to the image and drop degenerate ones with their labels and ``iscrowd``.

    Args:
        train: random horizontal flip with ``flip_prob``; ``min_size`` may be a list (multi-scale).
        min_size: shorter-side size (training: the sizes drawn from).
        max_size: cap of the longer side.
        flip_prob: horizontal-flip probability (training only).
    """
    steps: list[Callable] = []
    if min_size is not None:
        if not train and not isinstance(min_size, int):
            raise ValueError(f"evaluation resizes to one size, got min_size={min_size}")
        steps.append(ResizeShortestSide(min_size, max_size))
    if train and flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(flip_prob))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.ClampBoundingBoxes(),
              v2.SanitizeBoundingBoxes(labels_getter=_labels_and_crowd)]
    return v2.Compose(steps)


def image_transform(min_size: Optional[int] = None, max_size: Optional[int] = None) -> v2.Compose:
    """The image-only twin of ``detection_transform(train=False, min_size, max_size)`` for ``zoo predict`` on a
    folder: PIL image → uint8 tensor → the same shorter-side resize → float32 in [0, 1] (no normalisation: the models
    normalise inside)."""
    steps: list[Callable] = [v2.PILToTensor()]
    if min_size is not None:
        steps.append(ResizeShortestSide(min_size, max_size))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]]
                      ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``(list of images, list of targets)``: images keep their own sizes (models pad them)."""
    return [image for image, _ in batch], [target for _, target in batch]


def image_file_collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A batch of ``ImageFileDataset`` items (``zoo predict`` on a folder) that keeps the images' own sizes:
    ``{"image": list of (3, H, W), "path": list of str, "index": (B,) int64, "size": (B, 2) int64 (h, w) of the files}``.
    """
    return {"image": [item["image"] for item in items], "path": [item["path"] for item in items],
            "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.int64),
            "size": torch.stack([torch.as_tensor(item["size"], dtype=torch.int64) for item in items])}
