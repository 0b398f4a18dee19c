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
