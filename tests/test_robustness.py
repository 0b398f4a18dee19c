import csv
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, quiet_args, run_zoo
from zoo.callbacks import NonFiniteLossError
from zoo.cli import ZooCLI


def test_nan_loss_stops_with_step_and_batch_and_keeps_last_good_checkpoint(tmp_path):
    args = quiet_args(tmp_path, "--model.class_path=helpers.NaNAtStep", "--model.init_args.nan_at_step=7",
                      "--last_checkpoint.every_n_train_steps=5", "--trainer.max_epochs=5")
    with pytest.raises(NonFiniteLossError) as err:
        ZooCLI(args=["fit", *args])
    message = str(err.value)
    assert "global step 7" in message and "batch 7" in message and "last.ckpt" in message
    ckpt = torch.load(tmp_path / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def _last_step(path):
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_sigkill_then_resume_from_last_continues_step_optimizer_and_scheduler(tmp_path):
    root = tmp_path / "run"
    common = quiet_args(root, "--last_checkpoint.every_n_train_steps=4", "--trainer.log_every_n_steps=1",
                        "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={root}",
                        "--trainer.logger.name=csv", "--trainer.logger.version=0")
    env = {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "zoo", "fit", *common, "--trainer.max_epochs=1000"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**__import__("os").environ, **env})
    last = root / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not (last.is_file() and _last_step(last) >= 24):
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = _last_step(last)
    assert killed_at >= 24, "the run never wrote last.ckpt"
    killed = torch.load(last, map_location="cpu", weights_only=True)

    target = killed_at + 12
    result = run_zoo("fit", *common, "--ckpt_path=last", f"--trainer.max_steps={target}", "--trainer.max_epochs=1000",
                     "--trainer.logger.version=1")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == target
    # AdamW counts its own steps: a fresh optimizer would have counted 12, not `target`.
    adam_steps = {int(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()}
    assert adam_steps == {target}
    assert resumed["lr_schedulers"][0]["last_epoch"] >= killed["lr_schedulers"][0]["last_epoch"]
    with open(root / "csv" / "version_1" / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss_step")]
    assert steps and min(steps) >= killed_at and max(steps) == target - 1
