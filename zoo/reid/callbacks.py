"""What the re-ID runs show on the dashboard: rank lists of a few target queries, and the test CMC curve."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torchvision.utils import make_grid

from zoo.callbacks import ImageLogger, log_images, log_table

__all__ = ["RankListLogger", "log_cmc"]

_GREEN, _RED, _BLUE = (0.1, 0.75, 0.2), (0.9, 0.1, 0.1), (0.2, 0.4, 0.95)


def _framed(image: torch.Tensor, colour: tuple[float, float, float], width: int) -> torch.Tensor:
    """``image (3, H, W)`` inside a coloured frame ``width`` pixels wide."""
    frame = torch.tensor(colour).view(3, 1, 1).expand(3, image.shape[1] + 2 * width, image.shape[2] + 2 * width)
    frame = frame.clone()
    frame[:, width:-width, width:-width] = image
    return frame


class RankListLogger(ImageLogger):
    """After validation (``zoo.callbacks.ImageLogger``'s cadence) and test: one row per query, the query (blue frame) then its
    top ``top_k`` gallery images under the evaluation protocol, correct matches framed green and wrong ones red.

    Reads ``pl_module.last_rank_lists`` (filled by ``zoo.reid.ecn.ECN`` at the end of every evaluation) and the
    images from ``trainer.datamodule.query_set`` / ``gallery_set``. Images go to W&B (or TensorBoard, or a PNG
    under the run's root dir without a logger).
    """

    def __init__(self, num_queries: int = 6, top_k: int = 10, every_n_epochs: int = 5) -> None:
        super().__init__(every_n_epochs)
        self.num_queries, self.top_k = num_queries, top_k

    def draw(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        lists = getattr(pl_module, "last_rank_lists", None)
        datamodule = trainer.datamodule
        if not lists or lists["stage"] != stage or datamodule is None:
            return
        query_set, gallery_set = datamodule.query_set, datamodule.gallery_set
        denormalize = getattr(datamodule, "denormalize", lambda x: x.clamp(0, 1))
        width = max(1, query_set[0][0].shape[-1] // 16)
        tiles, captions = [], []
        count = min(self.num_queries, len(lists["queries"]))
        for row in range(count):
            q = int(lists["queries"][row])
            tiles.append(_framed(denormalize(query_set[q][0][None])[0], _BLUE, width))
            hits = []
            for g, correct in zip(lists["gallery"][row, : self.top_k].tolist(), lists["correct"][row].tolist()):
                tiles.append(_framed(denormalize(gallery_set[g][0][None])[0], _GREEN if correct else _RED, width))
                hits.append("✓" if correct else "·")
            captions.append(f"query {q} (pid {int(query_set.records.pids[q])}): {''.join(hits)}")
        if not tiles:
            return
        grid = make_grid(torch.stack(tiles), nrow=1 + min(self.top_k, lists["gallery"].shape[1]), padding=2,
                         pad_value=1.0)
        log_images(trainer, f"{stage}/rank_lists", grid.unsqueeze(0),
                   ["rows: query (blue) | top gallery, correct green, wrong red; " + " || ".join(captions)],
                   png_name=f"rank_lists/{stage}_epoch{trainer.current_epoch:03d}.png")


def log_cmc(trainer: "L.Trainer", cmc: torch.Tensor, key: str = "test/cmc", max_rank: int = 20) -> Path:
    """The CMC curve up to rank ``max_rank`` as a table (columns ``rank``, ``accuracy``) through
    ``zoo.callbacks.log_table`` (W&B table and ``<run>/tables/<key>.csv``) and, on W&B, as a line plot
    ``<key>_curve``. Call it on rank 0."""
    rows = [[rank, float(cmc[rank - 1])] for rank in range(1, min(max_rank, len(cmc)) + 1)]
    path = log_table(trainer, key, ["rank", "accuracy"], rows)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb  # noqa: PLC0415

            table = wandb.Table(columns=["rank", "accuracy"], data=rows)
            logger.experiment.log({f"{key}_curve": wandb.plot.line(table, "rank", "accuracy", title="CMC"),
                                   "trainer/global_step": trainer.global_step})
    return path
