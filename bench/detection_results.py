"""The Soft Teacher table of docs/models/detection.md: supervised Faster R-CNN vs Soft Teacher on the digit canvases
with 5 % of the training canvases labelled, through the CLI.

    python bench/detection_results.py --seeds 0 1 --jobs 2 [--out detection_results.jsonl] [--summary-only]

For each seed:

1. ``supervised``: ``zoo fit -c configs/detection/faster_rcnn_digits.yaml`` on the labelled 5 % only;
2. from its ``last.ckpt`` (``--finetune.init_from``), with the same data, steps and schedule each:
   * ``soft_teacher``: ``configs/detection/soft_teacher_digits.yaml``;
   * ``no_background_weighting``: the same with ``background_weighting: false`` (plain mean cross-entropy);
   * ``no_box_jittering``: the same with ``box_jittering: false`` (regression boxes chosen by score > 0.9);
   * ``continued_supervised``: the same with ``unsup_weight: 0`` — the supervised model trained on for the same
     steps, evaluated through its EMA teacher: what the extra steps and the EMA give without unlabelled images.

Every row is the test split (200 canvases of unseen writers): COCO mAP and mAP@0.5 of the teacher (Soft Teacher
rows) or of the model, the student's, and the precision / recall of the teacher's boxes scoring > 0.9 against the
true boxes (IoU ≥ 0.5, same class); for the Soft Teacher rows also the same precision / recall on the unlabelled
training canvases against their hidden boxes, as logged during training (``train/pseudo_precision``: mean over the
epochs, read from a ``CSVLogger``). Each run is a subprocess with ``OMP_NUM_THREADS=1``; ``--jobs`` run at once.
Rows are appended to ``--out`` (JSON lines) as they finish, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import cli_metrics  # noqa: E402  (bench/measure.py)

VARIANTS = {
    "soft_teacher": [],
    "no_background_weighting": ["--model.init_args.background_weighting=false"],
    "no_box_jittering": ["--model.init_args.box_jittering=false"],
    "continued_supervised": ["--model.init_args.unsup_weight=0.0"],
}


def _zoo(*args: str, csv_dir: Path | None = None) -> subprocess.CompletedProcess:
    logger = ["--trainer.logger=false"] if csv_dir is None else [
        "--trainer.logger=CSVLogger", f"--trainer.logger.init_args.save_dir={csv_dir}"]
    result = subprocess.run([sys.executable, "-m", "zoo", *args, *logger,
                             "--trainer.enable_progress_bar=false"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    if result.returncode != 0:
        raise RuntimeError(f"zoo {' '.join(args[:3])} failed:\n{result.stderr[-4000:]}")
    return result


def _row(variant: str, seed: int, metrics: dict[str, float], start: float) -> dict:
    keys = ("map", "map_50", "student/map", "student/map_50", "pseudo_precision", "pseudo_recall")
    return {"variant": variant, "seed": seed, **{k: metrics[k] for k in keys if k in metrics},
            "seconds": round(time.time() - start)}


def _training_pseudo_quality(csv_dir: Path) -> dict[str, float]:
    """The teacher's boxes > 0.9 on the unlabelled training canvases against their hidden boxes: the mean over the
    epochs of ``train/pseudo_precision`` and ``train/pseudo_recall`` (logged once per epoch), and the last epoch's."""
    with open(next(csv_dir.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/pseudo_precision")]
    precision = [float(r["train/pseudo_precision"]) for r in rows]
    recall = [float(r["train/pseudo_recall"]) for r in rows]
    return {"train_pseudo_precision": statistics.mean(precision), "train_pseudo_recall": statistics.mean(recall),
            "train_pseudo_precision_last": precision[-1]}


def run_seed(seed: int, data: Path, variants: list[str], jobs: int, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        config = ROOT / "configs" / "detection"
        common = [f"--data.init_args.root={data}", f"--seed_everything={seed}"]
        fit = _zoo("fit", "-c", str(config / "faster_rcnn_digits.yaml"), *common,
                   f"--trainer.default_root_dir={Path(tmp) / 'supervised'}")
        _write(out, _row("supervised", seed, cli_metrics(fit.stdout), start))
        checkpoint = Path(tmp) / "supervised" / "version_0" / "checkpoints" / "last.ckpt"

        def one(variant: str) -> None:
            begin = time.time()
            csv_dir = Path(tmp) / f"{variant}_csv"
            result = _zoo("fit", "-c", str(config / "soft_teacher_digits.yaml"), *common, *VARIANTS[variant],
                          f"--finetune.init_from={checkpoint}", f"--trainer.default_root_dir={Path(tmp) / variant}",
                          csv_dir=csv_dir)
            _write(out, {**_row(variant, seed, cli_metrics(result.stdout), begin), **_training_pseudo_quality(csv_dir)})

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(one, variants))


def _write(out: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def summary(rows: list[dict]) -> None:
    columns = ("map_50", "map", "student/map_50", "train_pseudo_precision", "train_pseudo_recall",
               "pseudo_precision", "pseudo_recall")
    print("| variant | mAP@0.5 | mAP | student mAP@0.5 | precision of boxes > 0.9, unlabelled train | their recall | "
          "precision > 0.9, test | recall, test | seeds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant in ("supervised", *VARIANTS):
        mine = [r for r in rows if r["variant"] == variant]
        if mine:
            cells = [_mean_sd([r[k] for r in mine if k in r]) for k in columns]
            print(f"| {variant} | {' | '.join(cells)} | {len(mine)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--data", default=str(ROOT / "data" / "digit_canvas_semi"))
    parser.add_argument("--out", default="detection_results.jsonl")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.summary_only:
        data = Path(args.data).resolve()
        # Seeds run side by side (their supervised stages too); each seed's Soft Teacher variants share its jobs.
        per_seed = max(1, args.jobs // len(args.seeds))
        with ThreadPoolExecutor(min(args.jobs, len(args.seeds))) as pool:
            list(pool.map(lambda seed: run_seed(seed, data, args.variants, per_seed, out), args.seeds))
    summary([json.loads(line) for line in out.read_text().splitlines() if line.strip()])


if __name__ == "__main__":
    main()
