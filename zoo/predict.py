"""``zoo predict``: the base of the families' prediction writers.

``zoo predict -c <config> --ckpt_path <ckpt> [--data.init_args.predict_dir <folder of images>]`` runs the model's
``predict_step`` over the datamodule's ``predict_dataloader`` (the test split, or one's own images) and hands every
batch to a ``PredictionWriter``, one of Lightning's ``BasePredictionWriter`` callbacks. Each family's LightningModule
names its writer in ``prediction_writer()``; the CLI adds it when the trainer has no writer of its own, so a config
can still pass another one under ``trainer.callbacks``.

A writer turns each batch into rows (``rows``) and may write per-item files there (drawn boxes, translated images);
at the end of the loop the rows of every DDP rank are gathered on rank 0 and ``finish`` writes the table files
(``predictions.csv``, COCO ``results.json``, rank lists). Files go to ``output_dir``, by default
``<run folder>/predictions/<name of predict_dir>`` (``predictions/test`` for the test split). The rows are kept by the writer, so the CLI runs ``predict`` with
``return_predictions: false`` and a large folder does not pile up model outputs in memory.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["PredictionWriter", "write_csv"]


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Write ``rows`` under ``header`` to ``path``; floats with 6 significant digits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    return path


class PredictionWriter(BasePredictionWriter):
    """Collects rows batch by batch on every rank and writes the result files once, on rank 0.

    A family subclasses it with:

    * ``rows(outputs, batch, dataloader_idx, folder, trainer, pl_module) -> list``: the rows of one batch (any
      picklable objects); it may write per-item files into ``folder`` itself (every rank writes its own items);
    * ``finish(rows, folder, trainer, pl_module) -> list[Path]``: write the files made of every rank's rows, ordered as
      the subclass needs, and return them (printed as the summary).

    Args:
        output_dir: where the files go; ``None``: ``<run folder>/predictions/<predict_dir name or "test">``.
    """

    def __init__(self, output_dir: Optional[str] = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self._rows: list[Any] = []

    def folder(self, trainer: "L.Trainer") -> Path:
        """``output_dir``, else ``<run folder>/predictions/`` for the test split and
        ``<run folder>/predictions/<predict_dir's name>/`` for a folder of images, so that predicting on several
        folders with one checkpoint keeps every result."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        predict_dir = getattr(getattr(trainer, "datamodule", None), "predict_dir", None)
        folder = Path(trainer.default_root_dir) / "predictions"
        return folder / Path(predict_dir).expanduser().resolve().name if predict_dir else folder

    def on_predict_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._rows = []
        self.folder(trainer).mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", prediction: Any,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        self._rows.extend(self.rows(prediction, batch, dataloader_idx, self.folder(trainer), trainer, pl_module))

    def on_predict_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        rows = self._rows
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if trainer.is_global_zero:
            folder = self.folder(trainer)
            written = self.finish(rows, folder, trainer, pl_module)
            names = ", ".join(str(Path(p).relative_to(folder)) if Path(p).is_relative_to(folder) else str(p)
                              for p in written)
            print(f"[zoo] predict: {len(rows)} predictions written to {folder}/ ({names})", flush=True)
        self._rows = []

    # ---- what a family implements ----------------------------------------------------------------------------------

    def rows(self, outputs: Any, batch: Any, dataloader_idx: int, folder: Path, trainer: "L.Trainer",
             pl_module: "L.LightningModule") -> list[Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement rows(...)")

    def finish(self, rows: list[Any], folder: Path, trainer: "L.Trainer", pl_module: "L.LightningModule") -> list[Path]:
        raise NotImplementedError(f"{type(self).__name__} must implement finish(...)")

    @staticmethod
    def to_list(value: Any) -> list:
        """A batch's tensor, list or tuple as a Python list (tensors moved to the CPU)."""
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().tolist()
        return list(value)
