import csv
import math

import torch
from lightning.pytorch.callbacks import Callback

from conftest import quiet_args, run_zoo
from zoo.cli import ZooCLI


def _test_metrics(root):
    with open(next(root.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("test/acc")]
    return float(rows[-1]["test/acc"])


def test_ddp_two_cpu_processes_train_like_one(tmp_path):
    def run(root, *extra):
        result = run_zoo("fit", *quiet_args(root, "--trainer.max_epochs=4", "--trainer.logger=CSVLogger",
                                            f"--trainer.logger.save_dir={root}", "--test_after_fit=true", *extra),
                         timeout=500)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    # Without augmentation and dropout: every rank starts from the same seed, so with data loading in the main
    # process the two ranks would draw the same augmentations and masks, a confound this comparison leaves out.
    plain = ("--data.init_args.augment=false", "--model.init_args.dropout=0")
    ddp = run(tmp_path / "ddp", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
              "--data.init_args.batch_size=32", *plain)
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in ddp.stderr + ddp.stdout
    # rank 1 is a new process that parses the command line again: it must write into rank 0's run folder
    assert sorted(p.name for p in (tmp_path / "ddp").glob("version_*")) == ["version_0"]
    assert (tmp_path / "ddp" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    run(tmp_path / "single", "--trainer.devices=1", "--trainer.accelerator=cpu", *plain)
    ddp_acc, single_acc = _test_metrics(tmp_path / "ddp"), _test_metrics(tmp_path / "single")
    # Same global batch (2 × 32 vs 64) and schedule: both learn, to within a few points of each other.
    assert ddp_acc > 0.9 and single_acc > 0.9
    assert abs(ddp_acc - single_acc) < 0.05


def test_bf16_mixed_precision_trains(tmp_path):
    # bf16 convolutions are emulated on most CPUs (slow), so this is a short run: 12 steps under autocast.
    cli = ZooCLI(args=quiet_args(tmp_path, "--trainer.precision=bf16-mixed", "--trainer.max_steps=12",
                                 "--trainer.limit_val_batches=0", "--optimizer.init_args.lr=0.01"), run=False)
    dtypes, losses = [], []
    cli.model.backbone.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))

    class RecordLoss(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    cli.trainer.callbacks.append(RecordLoss())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 12
    assert set(dtypes) == {torch.bfloat16}  # the backbone really ran in bf16
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # and it learns
