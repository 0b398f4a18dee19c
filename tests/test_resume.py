"""Resuming from a ``last.ckpt`` written in the middle of an epoch continues exactly where the run stopped.

A straight run records a fingerprint of every training batch; a second run is killed right after a checkpoint, and a
third resumes from that checkpoint. The resumed run must see exactly the batches the straight run saw after that
step (the items, their augmentation and the stream they belong to) and end with the same weights.
"""

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import ROOT
from zoo.cli import ZooCLI

SEMISUP = ROOT / "configs" / "semisup" / "supervised_digits.yaml"
DIGITS = ROOT / "configs" / "classification" / "digits.yaml"


class Killed(Exception):
    """Stands in for SIGKILL: raised when the step after ``kill_at_step`` starts, ``kill_at_step`` being saved."""


class RecordBatches(Callback):
    """Fingerprints of the training batches by global step (item content, so order and augmentation count)."""

    def __init__(self, kill_at_step: int | None = None) -> None:
        self.kill_at_step = kill_at_step
        self.batches: dict[int, list] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.kill_at_step:
            raise Killed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        def fingerprint(images, labels):
            return [round(float(x), 4) for x in images.flatten(1).sum(1)] + labels.tolist()

        if isinstance(batch, dict):  # the two-stream batch of the semi-supervised datamodule
            (weak, strong), hidden = batch["unlabeled"]
            record = fingerprint(*batch["labeled"]) + fingerprint(weak, hidden) + fingerprint(strong, hidden)
        else:
            record = fingerprint(batch[0], batch[1])
        self.batches[trainer.global_step] = record


def _fit(config: Path, root: Path, recorder: RecordBatches, *extra: str, ckpt_path: str | None = None):
    cli = ZooCLI(args=["-c", str(config), f"--trainer.default_root_dir={root}", "--trainer.logger=false",
                       "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                       "--trainer.callbacks=[]", "--test_after_fit=false", "--checkpoint.monitor=null", *extra],
                 run=False)
    cli.trainer.callbacks.append(recorder)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    except Killed:
        pass
    return cli


def _last(root: Path) -> str:
    """The killed run's ``last.ckpt`` (its run folder is the first under ``root``)."""
    return str(root / "version_0" / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("kill_at_step", [15, 20], ids=["mid-epoch", "epoch-end"])
def test_plain_datamodule_resumes_with_the_straight_runs_batches(tmp_path, kill_at_step):
    # 1,257 training digits in batches of 128: 10 steps per epoch; last.ckpt every 5 steps and at each epoch's end.
    # Step 15 is 5 batches into epoch 1; step 20 is epoch 1's last batch, whose step-based save waits for the
    # epoch's end (after validation), where the straight run starts epoch 2.
    small = ("--data.init_args.image_size=16", "--data.init_args.batch_size=128", "--trainer.max_epochs=3",
             "--model.init_args.backbone.init_args.widths=[8, 16]", "--last_checkpoint.every_n_train_steps=5")
    straight = RecordBatches()
    reference = _fit(DIGITS, tmp_path / "straight", straight, *small)
    killed = RecordBatches(kill_at_step=kill_at_step)
    _fit(DIGITS, tmp_path / "run", killed, *small)
    assert max(killed.batches) == kill_at_step
    resumed = RecordBatches()
    cli = _fit(DIGITS, tmp_path / "run", resumed, *small, ckpt_path=_last(tmp_path / "run"))

    assert sorted(resumed.batches) == list(range(kill_at_step + 1, 31))
    assert all(resumed.batches[step] == straight.batches[step] for step in resumed.batches)
    for (name, a), b in zip(reference.model.state_dict().items(), cli.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_two_stream_datamodule_resumes_both_streams_mid_epoch(tmp_path):
    # 1,257 unlabeled digits in steps of 16 × 7: 11 steps per epoch, two streams (labeled, unlabeled) in lock-step.
    small = ("--trainer.max_steps=26", "--trainer.limit_val_batches=0", "--last_checkpoint.every_n_train_steps=5",
             "--model.init_args.backbone.init_args.widths=[8, 16]")
    straight = RecordBatches()
    reference = _fit(SEMISUP, tmp_path / "straight", straight, *small)
    killed = RecordBatches(kill_at_step=15)  # 4 batches into epoch 1
    _fit(SEMISUP, tmp_path / "run", killed, *small)
    resumed = RecordBatches()
    cli = _fit(SEMISUP, tmp_path / "run", resumed, *small, ckpt_path=_last(tmp_path / "run"))

    assert sorted(resumed.batches) == list(range(16, 27))
    assert all(resumed.batches[step] == straight.batches[step] for step in resumed.batches)
    for (name, a), b in zip(reference.model.state_dict().items(), cli.model.state_dict().values()):
        assert torch.equal(a, b), name
