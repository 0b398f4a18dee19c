"""``zoo predict`` for unpaired translation: translated images as PNGs and ``index.csv``.

On the test split (no ``predict_dir``) both directions are written: ``testA`` → ``A2B/<name>.png`` and ``testB`` →
``B2A/<name>.png``. On a ``predict_dir`` every image is translated in the datamodule's ``predict_direction``
(``"a2b"`` by default, so the images are taken as domain A; ``--data.init_args.predict_direction b2a`` for domain-B
images) to ``A2B/<name>.png`` (or ``B2A/...``). ``<name>`` is the input's path relative to its folder with the ending
replaced by ``.png`` (``photos/me.jpg`` → ``A2B/photos/me.png``); two inputs that would share a name (``a.jpg`` and
``a.png``) keep their ending instead (``a.jpg.png``, ``a.png.png``). Outputs are the model's resolution (the
datamodule resizes inputs to its ``image_size²``), de-normalised from [−1, 1] to 8 bits.

``index.csv``: ``direction, input, output`` per image (``output`` relative to the predictions folder), in loader
and dataset order.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from PIL import Image
from torch.utils.data import Subset

from zoo.predict import PredictionWriter, write_csv

__all__ = ["TranslationWriter", "output_names", "to_uint8_image"]


def output_names(files: Sequence[str | Path]) -> list[str]:
    """Unique ``.png`` names for ``files``: each path relative to the files' common folder with its ending replaced
    by ``.png``; paths that would collide keep their ending and get ``.png`` appended."""
    paths = [Path(f) for f in files]
    if not paths:
        return []
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    relative = [p.relative_to(root) for p in paths]
    names = [r.with_suffix(".png").as_posix() for r in relative]
    counts = Counter(names)
    return [name if counts[name] == 1 else r.as_posix() + ".png" for name, r in zip(names, relative)]


def to_uint8_image(image: torch.Tensor) -> Image.Image:
    """A ``(C, H, W)`` image in [−1, 1] (C = 1 or 3) as an 8-bit PIL image."""
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if pixels.shape[0] == 1:
        return Image.fromarray(pixels[0].numpy())  # mode "L" from the 2-D uint8 array
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())  # "RGB"


def _base_dataset(dataset: Any) -> Any:
    """The dataset under the ``Subset`` shards of ``ZooDataModule.eval_loader``."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


class TranslationWriter(PredictionWriter):
    """Writes every translation as ``<A2B|B2A>/<name>.png`` (each rank its own images) and, on rank 0,
    ``index.csv``; see the module docstring.

    Args:
        output_dir: where the files go (default ``<run folder>/predictions``).
    """

    def __init__(self, output_dir: Optional[str] = None) -> None:
        super().__init__(output_dir)
        self._names: dict[int, list[str]] = {}

    def on_predict_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        super().on_predict_start(trainer, pl_module)
        self._names = {}

    def _output_names(self, trainer: "L.Trainer", dataloader_idx: int) -> list[str]:
        """The output names of every file of a loader's dataset (the whole dataset, so every rank agrees)."""
        if dataloader_idx not in self._names:
            loaders = trainer.predict_dataloaders
            loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
            self._names[dataloader_idx] = output_names(_base_dataset(loader.dataset).files)
        return self._names[dataloader_idx]

    def rows(self, outputs: dict[str, Any], batch: Any, dataloader_idx: int, folder: Path, trainer: "L.Trainer",
             pl_module: "L.LightningModule") -> list[tuple]:
        """Writes the batch's PNGs; one ``(loader, index, direction, input, output)`` row per image."""
        direction = outputs["direction"].upper()  # "A2B" / "B2A": the folder name
        names = self._output_names(trainer, dataloader_idx)
        loaders = trainer.predict_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        files = _base_dataset(loader.dataset).files
        rows = []
        for image, index in zip(outputs["fake"], self.to_list(outputs["index"])):
            output = Path(direction) / names[index]
            (folder / output).parent.mkdir(parents=True, exist_ok=True)
            to_uint8_image(image).save(folder / output)
            rows.append((dataloader_idx, index, direction, str(files[index]), output.as_posix()))
        return rows

    def finish(self, rows: list[tuple], folder: Path, trainer: "L.Trainer",
               pl_module: "L.LightningModule") -> list[Path]:
        rows = sorted(rows, key=lambda row: (row[0], row[1]))
        written = [write_csv(folder / "index.csv", ["direction", "input", "output"], [row[2:] for row in rows])]
        return written + sorted({folder / row[2] for row in rows})
