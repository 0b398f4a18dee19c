import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "classification" / "digits.yaml"


def pytest_configure(config):
    # Under pytest-xdist every worker is one process of a few, on a machine with few cores: one torch thread each
    # (and in the processes the tests start) runs the suite faster than workers fighting over the cores.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


def quiet_args(root: Path, *extra: str, config: Path = DIGITS) -> list[str]:
    """CLI arguments for a quick, quiet digits run rooted at ``root`` (no logger, no CAM/baseline callbacks)."""
    return [
        "-c", str(config),
        f"--trainer.default_root_dir={root}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks=[]",
        "--test_after_fit=false",
        *extra,
    ]


def run_zoo(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m zoo`` in a fresh process (as a user would), from the repository root."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "zoo", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def write_cifar10(root: Path, per_batch: int = 10, seed: int = 0) -> Path:
    """A tiny CIFAR-10 in the real python-pickle format: data_batch_1..5, test_batch, batches.meta."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": [i % 10 for i in range(per_batch)], "batch_label": name}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch}, f)
    return root


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size=(20, 24)) -> Path:
    """A train/ val/ tree of class folders holding real JPEG files."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    return root


def write_omniglot(root: Path, alphabets: dict | None = None, drawers: int = 6, size: int = 105) -> Path:
    """A tiny Omniglot in the release layout: images_background/ and images_evaluation/, 1-bit PNGs named
    ``<CCCC>_<DD>.png``; each character is a fixed random polyline, each drawer jitters it."""
    import numpy as np
    from PIL import Image, ImageDraw

    alphabets = alphabets or {"images_background": {"Alpha": 4, "Beta": 4, "Gamma": 3},
                              "images_evaluation": {"Delta": 4, "Epsilon": 3}}
    number = 0
    for folder, chars in alphabets.items():
        for alphabet, n_chars in chars.items():
            for c in range(1, n_chars + 1):
                number += 1
                rng = np.random.default_rng(number)
                points = rng.uniform(0.15, 0.85, (4, 2)) * size
                d = root / folder / alphabet / f"character{c:02d}"
                d.mkdir(parents=True)
                for drawer in range(1, drawers + 1):
                    img = Image.new("1", (size, size), 1)
                    jitter = points + rng.normal(0, 2, points.shape)
                    ImageDraw.Draw(img).line([tuple(p) for p in jitter], fill=0, width=4)
                    img.save(d / f"{number:04d}_{drawer:02d}.png")
    return root


def write_closerlook(root: Path, classes: dict | None = None, per_class: int = 6, size=(40, 48)) -> Path:
    """CloserLook split files base.json / val.json / novel.json over real JPEGs, labels global across splits
    (as CloserLook's write_*_filelist.py writes them); image paths relative to ``root``."""
    import json

    import numpy as np
    from PIL import Image

    classes = classes or {"base": 6, "val": 5, "novel": 5}
    rng = np.random.default_rng(0)
    label_names, label = [], 0
    for split, n in classes.items():
        names, labels = [], []
        for _ in range(n):
            wnid = f"n{label:08d}"
            label_names.append(wnid)
            d = root / "images" / wnid
            d.mkdir(parents=True)
            colour = rng.integers(0, 255, 3)
            for i in range(per_class):
                pixels = np.clip(colour + rng.normal(0, 30, (*size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{wnid}_{i}.jpg")
                names.append(f"images/{wnid}/{wnid}_{i}.jpg")
                labels.append(label)
            label += 1
        (root / f"{split}.json").write_text(json.dumps({"label_names": label_names, "image_names": names,
                                                        "image_labels": labels}))
    return root


def results_from_stdout(stdout: str, prefix: str = "") -> dict[str, float]:
    """The metrics of the CLI's results tables in ``stdout`` (``name  value`` or ``name  value ± ci``; a CI is returned
    as its own entry, the name with ``acc`` replaced by ``ci95``), keeping names that start with ``prefix``."""
    import re

    metrics: dict[str, float] = {}
    for name, value, ci in re.findall(r"^\s+(\S+/\S+)\s+(-?[0-9.]+(?:e[-+]?\d+)?)(?: ± ([0-9.]+))?\s*$", stdout, re.M):
        if not name.startswith(prefix):
            continue
        metrics[name] = float(value)
        if ci:
            metrics[name.replace("acc", "ci95", 1)] = float(ci)
    return metrics


def prediction_folder(cli) -> Path:
    """Where the prediction writer of a ``zoo predict`` run wrote its files."""
    from zoo.predict import PredictionWriter

    writer = next(cb for cb in cli.trainer.callbacks if isinstance(cb, PredictionWriter))
    return writer.folder(cli.trainer)
