"""Does a detector's score rank its boxes by localisation quality? GFL's claim (Li et al. 2020, §3 and Fig. 2):
training the class score towards the IoU (QFL) makes score and IoU agree, where focal loss + centerness (ATSS) does
not fully.

For each trained run directory (the ``config.yaml`` Lightning's CLI saved there and a checkpoint, ``last.ckpt`` by
default), the detections on the test split are matched greedily, highest score first, to the same-class ground-truth
box they overlap most at IoU ≥ 0.5 (each box once). Printed per run: the number of these true positives, their mean
IoU and its standard deviation, the Pearson and Spearman correlations between score and IoU over them, and the
Pearson correlation over the ones scoring ≥ 0.3 only (the detections a user keeps).

    python bench/detection_score_iou.py runs/atss_digits runs/gfl_digits [--checkpoint last.ckpt]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.stats import pearsonr, spearmanr
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.cli import ZooCLI  # noqa: E402


def true_positives(det: dict, target: dict, threshold: float = 0.5) -> tuple[list[float], list[float]]:
    """Scores and IoUs of the detections matched to a distinct same-class GT box at IoU ≥ ``threshold``."""
    scores, ious = [], []
    if not len(det["boxes"]) or not len(target["boxes"]):
        return scores, ious
    overlap = box_iou(det["boxes"], target["boxes"])
    overlap[det["labels"][:, None] != target["labels"][None, :]] = 0
    taken = torch.zeros(len(target["boxes"]), dtype=torch.bool)
    for i in det["scores"].argsort(descending=True).tolist():
        row = overlap[i].masked_fill(taken, 0)
        best = int(row.argmax())
        if row[best] >= threshold:
            taken[best] = True
            scores.append(float(det["scores"][i]))
            ious.append(float(row[best]))
    return scores, ious


def evaluate(run: Path, checkpoint: str) -> dict[str, float]:
    config = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("ckpt_path", "weights_only"):  # saved by `zoo fit`, not settings of the model or the data
        config.pop(key, None)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(config, file)
        cli = ZooCLI(args=["-c", file.name, "--trainer.logger=false"], run=False)
    model, datamodule = cli.model, cli.datamodule
    model.load_state_dict(torch.load(run / "checkpoints" / checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    model.eval()
    datamodule.setup("test")
    scores, ious = [], []
    with torch.no_grad():
        for images, targets in datamodule.test_dataloader():
            for det, target in zip(model.predict_images(images), targets):
                s, i = true_positives(det, target)
                scores += s
                ious += i
    scores, ious = np.array(scores), np.array(ious)
    kept = scores >= 0.3
    return {"true positives": len(scores), "mean IoU": ious.mean(), "IoU std": ious.std(),
            "Pearson": pearsonr(scores, ious)[0],
            "Spearman": spearmanr(scores, ious)[0], "Pearson, score ≥ 0.3": pearsonr(scores[kept], ious[kept])[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (default_root_dir of zoo fit)")
    parser.add_argument("--checkpoint", default="last.ckpt")
    args = parser.parse_args()
    rows = {str(run): evaluate(run, args.checkpoint) for run in args.runs}
    columns = list(next(iter(rows.values())))
    print("| run | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for run, values in rows.items():
        print(f"| {run} | " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in values.values()) + " |")


if __name__ == "__main__":
    main()
