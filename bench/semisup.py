"""Semi-supervised step costs, measured in one run: UDA and Meta Pseudo Labels against a plain supervised step, and
the augmentation pipeline's time per step.

1. **Training step** (ms per step, lower is better), WRN-28-2 (``zoo.backbones.WideResNet``) on random 32×32 images.
   Every side runs through a real ``lightning.Trainer`` step loop on the same pre-built batches of ``B`` labeled and
   ``μB`` unlabeled images (two views each), so all pay the same framework overhead:

   * **plain**: ``ImageClassifier``-style supervised step on ``B + 2μB`` labeled images (the same number of images
     through the network as UDA's joint forward) — ``zoo.semisup.base.SemiSupervisedClassifier`` fed a labeled batch
     of that size;
   * **UDA**: ``zoo.semisup.uda.UDA``, one forward on ``[x_l, x_weak, x_strong]``, TSA + masked consistency;
   * **MPL**: ``zoo.semisup.meta_pseudo_labels.MetaPseudoLabels``: teacher on ``B + 2μB``, student on ``μB`` plus two
     no-grad passes on ``B``, two backward passes and two optimizer steps.

   ``UDA / plain`` is the price of the losses (≈ 1 expected); ``MPL / plain`` the price of the second network.
2. **Augmentation per step** (ms): ``CIFAR10SemiSupDataModule``'s transforms in one process — weak view of ``B``
   labeled images, weak + strong (RandAugment + Cutout) of ``μB`` unlabeled images, from uint8 32×32 tensors — the
   work a loader must hide; with ``w`` workers it takes about this time divided by ``w``.

    python bench/semisup.py [--batch 8] [--mu 7] [--steps 4] [--warmup 1] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from lightning.pytorch.utilities.combined_loader import CombinedLoader  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from datamodules.semisup import CIFAR10SemiSupDataModule  # noqa: E402
from zoo.backbones import WideResNet  # noqa: E402
from zoo.semisup.base import SemiSupervisedClassifier  # noqa: E402
from zoo.semisup.meta_pseudo_labels import MetaPseudoLabels  # noqa: E402
from zoo.semisup.uda import UDA  # noqa: E402


class _Fixed(Dataset):
    """``length`` copies of one pre-built batch element list (no data-loading cost in the step timing)."""

    def __init__(self, items: list, length: int) -> None:
        self.items, self.length = items, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.items[i % len(self.items)]


class _StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._t = warmup, [], 0.0

    def on_train_batch_start(self, *args) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def _loader(labeled: int, unlabeled: int, steps: int) -> CombinedLoader:
    g = torch.Generator().manual_seed(0)
    l_items = [(torch.rand(3, 32, 32, generator=g), torch.randint(0, 10, (), generator=g)) for _ in range(labeled)]
    u_items = [((torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g)),
                torch.randint(0, 10, (), generator=g)) for _ in range(max(unlabeled, 1))]
    dl_l = DataLoader(_Fixed(l_items, labeled * steps), batch_size=labeled)
    dl_u = DataLoader(_Fixed(u_items, max(unlabeled, 1) * steps), batch_size=max(unlabeled, 1))
    return CombinedLoader({"labeled": dl_l, "unlabeled": dl_u}, mode="max_size_cycle")


def time_steps(model: L.LightningModule, labeled: int, unlabeled: int, steps: int, warmup: int, device: str,
               optimizer_steps_per_batch: int = 1) -> float:
    """Median ms per training step after ``warmup`` steps."""
    timer = _StepTimer(warmup)
    trainer = L.Trainer(accelerator=device, devices=1, max_steps=(steps + warmup) * optimizer_steps_per_batch,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=_loader(labeled, unlabeled, steps + warmup))
    times = sorted(timer.times[warmup:])
    return 1e3 * times[len(times) // 2]


def augmentation_ms(batch: int, mu: int, repeats: int = 3) -> float:
    data = CIFAR10SemiSupDataModule()
    weak, strong = data.weak_transform(), data.strong_transform()
    images = torch.randint(0, 256, (batch + mu * batch, 3, 32, 32), dtype=torch.uint8)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i, image in enumerate(images):
            weak(image)
            if i >= batch:
                strong(image)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="labeled images per step (B)")
    parser.add_argument("--mu", type=int, default=7, help="unlabeled images per labeled one")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    b, u = args.batch, args.mu * args.batch
    total = b + 2 * u

    plain = time_steps(SemiSupervisedClassifier(backbone=WideResNet(), num_classes=10), total, 1, args.steps, args.warmup, args.device)
    uda = time_steps(UDA(backbone=WideResNet(), num_classes=10), b, u, args.steps, args.warmup, args.device)
    mpl = time_steps(MetaPseudoLabels(backbone=WideResNet(), num_classes=10), b, u, args.steps, args.warmup, args.device,
                     optimizer_steps_per_batch=2)
    aug = augmentation_ms(b, args.mu)

    print(f"semisup bench: WRN-28-2, 32x32, B={b}, mu={args.mu} ({total} images through the network per step), "
          f"device={args.device}, threads={args.threads}, median of {args.steps} steps")
    print(f"{'step':<36}{'ms':>10}{'ratio':>10}")
    print(f"{'plain supervised (same images)':<36}{plain:>10.1f}{1.0:>10.2f}")
    print(f"{'UDA':<36}{uda:>10.1f}{uda / plain:>10.2f}")
    print(f"{'Meta Pseudo Labels':<36}{mpl:>10.1f}{mpl / plain:>10.2f}")
    print(f"{'augmentation, 1 process':<36}{aug:>10.1f}{aug / uda:>10.2f}  (of a UDA step)")


if __name__ == "__main__":
    main()
