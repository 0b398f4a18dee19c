"""The results table of docs/models/wsss.md: CAM, SEAM-lite and SEAM-lite + PPC on the digit canvases, through the CLI.

    python bench/wsss_results.py --seeds 0 1 --jobs 2 [--out wsss_results.jsonl] [--summary-only]

For each seed and variant (``configs/wsss/{cam,seam,ppc}_digits.yaml``):

1. ``zoo fit`` (test after fit): the pseudo-mask mIoU of the 500 training canvases with masks at the best background
   threshold of the sweep (the seed mIoU; read from the run's ``tables/val_miou_vs_bg_threshold.csv``, the last
   validation), and the val canvases' CAM mIoU at that threshold (``test/cam_miou``);
2. ``zoo predict``: the pseudo masks of the 2 000 training canvases as VOC-palette PNGs;
3. ``zoo fit -c configs/wsss/deeplab_digits.yaml`` on those masks: the stage-2 val mIoU (``test/miou``).

Beside them, measured the same way: the all-background predictor (every pixel background: IoU_bg / 11), and the
upper bound from the labels themselves: the stage-2 network trained on the ground-truth masks (the pseudo-mask
mIoU of the ground truth is 1 by construction).

Each run is a subprocess with ``OMP_NUM_THREADS=1``; ``--jobs`` pipelines run at once. Rows are appended to ``--out``
(JSON lines) as they finish, so an interrupted sweep keeps what it measured.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import cli_metrics  # noqa: E402  (bench/measure.py)
VARIANTS = ("cam", "seam", "ppc")


def _zoo(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "zoo", *args, "--trainer.logger=false",
                             "--trainer.enable_progress_bar=false"], capture_output=True, text=True, cwd=cwd,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    if result.returncode != 0:
        raise RuntimeError(f"zoo {' '.join(args[:3])} failed:\n{result.stderr[-4000:]}")
    return result


def stage2(data: Path, masks: Path, seed: int, run_dir: Path) -> float:
    result = _zoo("fit", "-c", str(ROOT / "configs" / "wsss" / "deeplab_digits.yaml"), f"--seed_everything={seed}",
                  f"--data.init_args.root={data}", f"--data.init_args.pseudo_mask_dir={masks}",
                  f"--trainer.default_root_dir={run_dir}")
    return cli_metrics(result.stdout)["miou"]


def run(variant: str, seed: int, data: Path) -> dict:
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        run_root = Path(tmp) / variant
        if variant == "upper_bound":
            row = {"pseudo_miou": 1.0, "stage2_miou": stage2(data, data / "SegmentationClassAug", seed, run_root)}
        else:
            config = ROOT / "configs" / "wsss" / f"{variant}_digits.yaml"
            common = ["-c", str(config), f"--data.init_args.root={data}", f"--trainer.default_root_dir={run_root}"]
            fit = _zoo("fit", *common, f"--seed_everything={seed}", f"--model.init_args.seed={seed}")
            version = run_root / "version_0"
            with open(version / "tables" / "val_miou_vs_bg_threshold.csv") as f:
                curve = [(float(r["pseudo_miou"]), float(r["bg_threshold"])) for r in csv.DictReader(f)]
            pseudo, threshold = max(curve, key=lambda x: x[0])
            predicted = _zoo("predict", *common, f"--ckpt_path={version / 'checkpoints' / 'last.ckpt'}")
            folder = next(line.split(" written to ")[1].split("/ (")[0] for line in predicted.stdout.splitlines()
                          if " written to " in line)
            row = {"pseudo_miou": pseudo, "bg_threshold": threshold,
                   "val_cam_miou": cli_metrics(fit.stdout)["cam_miou"],
                   "stage2_miou": stage2(data, Path(folder), seed, Path(tmp) / "stage2")}
    return {"variant": variant, "seed": seed, **row, "seconds": round(time.time() - start)}


def all_background(data: Path) -> dict:
    """The all-background predictor's mIoU on the pseudo-mask set and on val, with the same metric."""
    from datamodules.wsss import DigitCanvasWSSSDataModule
    from zoo.wsss.evaluation import ThresholdSweepIoU

    datamodule = DigitCanvasWSSSDataModule(root=str(data))
    datamodule.setup("validate")
    scores = {}
    for name, dataset in zip(("pseudo_miou", "val_miou"), datamodule.evaluation_sets("val")):
        metric = ThresholdSweepIoU(datamodule.num_classes + 1, (0.5,))
        for batch in datamodule.eval_loader(dataset):
            metric.update(torch.zeros(len(batch["mask"]), datamodule.num_classes, *batch["mask"].shape[-2:]),
                          batch["mask"])
        scores[name] = float(metric.curve()[0])
    return scores


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def summary(rows: list[dict]) -> None:
    print("| variant | pseudo-mask mIoU (train, best bg) | val mIoU of the maps | stage-2 val mIoU | seeds |")
    print("|---|---|---|---|---|")
    for variant in ("all_background", *VARIANTS, "upper_bound"):
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        cells = [_mean_sd([r[k] for r in mine if k in r]) for k in ("pseudo_miou", "val_cam_miou", "stage2_miou")]
        print(f"| {variant} | {' | '.join(cells)} | {len(mine)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=[*VARIANTS, "upper_bound"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--data", default=str(ROOT / "data" / "wsss_digit_canvas"))
    parser.add_argument("--out", default="wsss_results.jsonl")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.summary_only:
        data = Path(args.data).resolve()
        background = {"variant": "all_background", "seed": -1, **all_background(data)}
        background["val_cam_miou"] = background["stage2_miou"] = background.pop("val_miou")
        with open(out, "a") as f:
            f.write(json.dumps(background) + "\n")
        jobs = [(variant, seed) for seed in args.seeds for variant in args.variants]

        def one(job: tuple) -> None:
            row = run(*job, data)
            print(json.dumps(row), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, jobs))
    summary([json.loads(line) for line in out.read_text().splitlines() if line.strip()])


if __name__ == "__main__":
    main()
