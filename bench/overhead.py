"""Per-step overhead of training through ``zoo`` versus a raw PyTorch loop, measured in one run.

Same model (timm ResNet-18 + GAP + linear, via ``ImageClassifier``), same data (digits at 64×64×3 from
``DigitsDataModule``, batch 32), same optimizer (AdamW) and number of steps. The zoo side runs through ``ZooCLI`` with
its defaults (W&B offline logger, checkpoint callbacks, non-finite-loss guard, LR monitor, progress bar off), with
validation switched off because the raw loop does not validate. Steady-state time per step is timed from step
``--warmup`` on, on both sides, and the runs alternate (raw, zoo, raw, zoo...) so machine noise hits both.

    python bench/overhead.py [--steps 40] [--warmup 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from lightning.pytorch.callbacks import Callback

from zoo.cli import ZooCLI

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "classification", "digits.yaml")


class StepTimer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.end, self.steps = time.perf_counter(), self.steps + 1


def zoo_run(steps: int, warmup: int, root: str) -> float:
    args = [
        "-c", CONFIG, f"--trainer.default_root_dir={root}", "--trainer.callbacks=[]",
        "--model.init_args.backbone.class_path=zoo.backbones.TimmBackbone",
        "--model.init_args.backbone.init_args.name=resnet18", "--model.init_args.backbone.init_args.in_chans=3",
        "--data.init_args.image_size=64", "--data.init_args.channels=3", "--data.init_args.batch_size=32",
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--test_after_fit=false", "--lr_scheduler=null",
        "--trainer.logger.init_args.save_dir=" + root,
    ]
    cli = ZooCLI(args=args, run=False)
    timer = StepTimer(warmup)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return (timer.end - timer.start) / timer.steps


def raw_run(steps: int, warmup: int) -> float:
    from datamodules.digits import DigitsDataModule
    from zoo.backbones import TimmBackbone
    from zoo.classification.classifier import ImageClassifier

    torch.manual_seed(0)
    dm = DigitsDataModule(image_size=64, channels=3, batch_size=32)
    dm.setup("fit")
    model = ImageClassifier(backbone=TimmBackbone("resnet18", in_chans=3), num_classes=10).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.0005)
    criterion = torch.nn.CrossEntropyLoss()
    step, start = 0, None
    while step < steps:
        for images, labels in dm.train_dataloader():
            if step == warmup:
                start = time.perf_counter()
            loss = criterion(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()  # the zoo logs the loss every step, which syncs; so does this
            step += 1
            if step == steps:
                break
    return (time.perf_counter() - start) / (steps - warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    opts = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    raw, zoo = [], []
    with tempfile.TemporaryDirectory() as root:
        for r in range(opts.repeats):
            raw.append(raw_run(opts.steps, opts.warmup))
            zoo.append(zoo_run(opts.steps, opts.warmup, os.path.join(root, str(r))))
    raw_s, zoo_s = statistics.median(raw), statistics.median(zoo)
    print(f"\nResNet-18 (timm), batch 32, 64x64x3 digits, AdamW, {opts.steps - opts.warmup} timed steps x {opts.repeats}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{'':12s}{'s/step (median)':>18s}{'all runs':>28s}")
    print(f"{'raw loop':12s}{raw_s:18.4f}{'  '.join(f'{x:.4f}' for x in raw):>28s}")
    print(f"{'zoo':12s}{zoo_s:18.4f}{'  '.join(f'{x:.4f}' for x in zoo):>28s}")
    print(f"ratio zoo / raw = {zoo_s / raw_s:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
