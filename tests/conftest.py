import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "classification" / "digits.yaml"


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
