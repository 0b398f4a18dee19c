"""``zoo predict`` for re-ID: a ranked gallery for every query, written as ``rank_lists.csv``.

The datamodule serves two loaders, queries (0) then gallery (1), of ``(images, pids, cameras, indices)``: the target's
test split, or a ``predict_dir`` with ``query/`` and ``gallery/`` (``datamodules.reid.PREDICT_LAYOUT``). The model's
``predict_step`` returns their test features; ``RankListWriter`` ranks the gallery for every query exactly as the
evaluation does (``zoo.reid.evaluation``): L2-normalised features, squared Euclidean distance, stable sort, and the
Market-1501 rule that a gallery image of the query's person *from the query's camera* is left out. The rule needs both
ids: images whose names carry none (pid ``-1``, e.g. one's own photos) are never left out.

``rank_lists.csv``, one row per query, in query order:

* ``query`` (file path), ``pid``, ``camid`` (1-based, as in the file name ``..._c<camid>...``; empty when unknown);
* ``first_match``: the 1-based rank of the first gallery image of the query's person in the whole filtered ranking,
  ``ap``: the query's average precision (the non-interpolated AP of the evaluation's mAP); both empty when the
  query's id is unknown or no image of it is left in the gallery (the evaluation skips such queries). The mean of
  ``first_match == 1`` over the rows that have one is the evaluation's rank-1, the mean of ``ap`` its mAP;
* ``gallery_<r>``, ``pid_<r>``, ``distance_<r>`` for ``r = 1 .. top_k``: the ``r``-th gallery file, its pid and its
  squared Euclidean distance to the query.

``features.pt`` (``save_features=True``): ``{"query": {"features", "paths", "pids", "cams"}, "gallery": {...}}``, the
features as ranked (L2-normalised), cameras 0-based.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from zoo.predict import PredictionWriter, write_csv
from zoo.reid.evaluation import evaluate_ranking, pairwise_squared_distance

__all__ = ["RankListWriter", "rank_gallery"]


def rank_gallery(query_features: torch.Tensor, gallery_features: torch.Tensor, query_pids: torch.Tensor,
                 gallery_pids: torch.Tensor, query_cams: torch.Tensor, gallery_cams: torch.Tensor, top_k: int = 10,
                 chunk_elements: int = 1 << 24) -> dict[str, torch.Tensor]:
    """Every query's ``top_k`` gallery images under the evaluation's protocol, and its first-match rank and AP.

    pids ``< 0`` are unknown: such a query leaves nothing out and has no first match or AP. Queries go in chunks of
    ``chunk_elements / G`` rows (``zoo.reid.evaluation.reid_metrics`` does the same).

    Returns:
        ``{"top": (Q, k) gallery indices, "distance": (Q, k), "kept": (Q, k) bool (False where fewer than k gallery
        images are left), "first_match": (Q,) 1-based rank or 0, "ap": (Q,) float64, "valid": (Q,) bool}``.
    """
    query_features, gallery_features = F.normalize(query_features.float()), F.normalize(gallery_features.float())
    num_gallery = len(gallery_pids)
    top_k = min(top_k, num_gallery)
    rows = max(1, chunk_elements // max(1, num_gallery))
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(query_pids), rows):
        block = slice(start, start + rows)
        distance = pairwise_squared_distance(query_features[block], gallery_features)
        q_pids, q_cams = query_pids[block], query_cams[block]
        removed = ((gallery_pids[None] == q_pids[:, None]) & (gallery_cams[None] == q_cams[:, None])
                   & (q_pids[:, None] >= 0))
        # The evaluation's stable sort with the left-out images moved to the end keeps the order of the others.
        order = distance.masked_fill(removed, float("inf")).argsort(dim=1, stable=True)[:, :top_k]
        kept = ~removed.gather(1, order)
        # evaluate_ranking over the whole gallery: first match anywhere in the ranking, and the same AP as mAP's.
        known = q_pids >= 0
        hits, ap, valid = evaluate_ranking(distance, q_pids, gallery_pids, q_cams, gallery_cams,
                                           max_rank=num_gallery)
        valid = valid & known
        first_match = torch.where(valid, num_gallery - hits.sum(1) + 1, torch.zeros_like(q_pids))
        for name, value in (("top", order), ("distance", distance.gather(1, order)), ("kept", kept),
                            ("first_match", first_match), ("ap", ap), ("valid", valid)):
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


def _base_dataset(dataset: Any) -> Any:
    """The dataset under the ``Subset`` shards of ``ZooDataModule.eval_loader``."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


class RankListWriter(PredictionWriter):
    """Writes ``rank_lists.csv`` (and ``features.pt`` when asked) from the query and gallery features of
    ``zoo predict``; see the module docstring for the columns.

    Args:
        output_dir: where the files go; ``None``: ``PredictionWriter.folder`` (the run folder's ``predictions/``).
        top_k: gallery images listed per query.
        save_features: also write ``features.pt``.
    """

    def __init__(self, output_dir: Optional[str] = None, top_k: int = 10, save_features: bool = False) -> None:
        super().__init__(output_dir)
        if top_k < 1:
            raise ValueError(f"top_k must be ≥ 1, got {top_k}")
        self.top_k, self.save_features = top_k, save_features

    def rows(self, outputs: dict[str, torch.Tensor], batch: Any, dataloader_idx: int, folder: Path,
             trainer: "L.Trainer", pl_module: "L.LightningModule") -> list[tuple]:
        """One ``(loader, index, feature, pid, camera)`` per image; the ranking needs every rank's images first."""
        features = outputs["features"].detach().float().cpu()
        # Each feature copied out of the batch tensor: a view would pickle the whole batch when DDP gathers the rows.
        return list(zip([dataloader_idx] * len(features), self.to_list(outputs["indices"]),
                        [f.clone() for f in features], self.to_list(outputs["pids"]), self.to_list(outputs["cameras"])))

    def finish(self, rows: list[tuple], folder: Path, trainer: "L.Trainer",
               pl_module: "L.LightningModule") -> list[Path]:
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        if len(loaders) != 2:
            raise RuntimeError(f"re-ID predict needs two loaders (query, gallery), got {len(loaders)}")
        sets = {}
        for split, loader_idx in (("query", 0), ("gallery", 1)):
            items = sorted((row for row in rows if row[0] == loader_idx), key=lambda row: row[1])
            dataset = _base_dataset(loaders[loader_idx].dataset)
            records = getattr(dataset, "records", None)
            indices = [row[1] for row in items]
            sets[split] = {
                "features": torch.stack([row[2] for row in items]) if items else torch.zeros(0, 0),
                "paths": [str(records.paths[i]) if records is not None else str(i) for i in indices],
                "pids": torch.tensor([row[3] for row in items], dtype=torch.int64),
                "cams": torch.tensor([row[4] for row in items], dtype=torch.int64),
            }
        query, gallery = sets["query"], sets["gallery"]
        if len(gallery["paths"]) == 0 or len(query["paths"]) == 0:
            raise RuntimeError("re-ID predict: the query or the gallery is empty")
        ranked = rank_gallery(query["features"], gallery["features"], query["pids"], gallery["pids"], query["cams"],
                              gallery["cams"], self.top_k)
        k = ranked["top"].shape[1]
        header = ["query", "pid", "camid", "first_match", "ap"]
        header += [f"{name}_{r}" for r in range(1, k + 1) for name in ("gallery", "pid", "distance")]
        table = []
        for q in range(len(query["paths"])):
            pid, cam = int(query["pids"][q]), int(query["cams"][q])
            valid = bool(ranked["valid"][q])
            row: list[Any] = [query["paths"][q], pid if pid >= 0 else "", cam + 1 if cam >= 0 else "",
                              int(ranked["first_match"][q]) if valid else "", float(ranked["ap"][q]) if valid else ""]
            for g, distance, kept in zip(ranked["top"][q].tolist(), ranked["distance"][q].tolist(),
                                         ranked["kept"][q].tolist()):
                g_pid = int(gallery["pids"][g])
                row += [gallery["paths"][g], g_pid if g_pid >= 0 else "", float(distance)] if kept else ["", "", ""]
            table.append(row)
        written = [write_csv(folder / "rank_lists.csv", header, table)]
        if self.save_features:
            for part in sets.values():
                part["features"] = F.normalize(part["features"].float())
            torch.save(sets, folder / "features.pt")
            written.append(folder / "features.pt")
        return written
