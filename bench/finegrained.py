"""Fine-grained costs, measured in one run: API-Net's training step against the plain classifier's, pair mining,
and the balanced sampler.

1. **Training step, API-Net vs plain classifier** (ms per step, lower is better). Both sides use the same backbone
   (default timm ``resnet18`` through ``zoo.backbones.TimmBackbone``, random weights) on the same batch of
   ``--classes × --per-class`` images (default 10 × 10 = 100, ``--image-size`` 112 px): the plain side is
   ``backbone → GAP → fc → cross-entropy → backward → SGD step``; the API-Net side is ``APINet.pair_forward``
   (mining, mutual vector, gates, four attentive features through ``fc``, cross-entropy + ranking loss) → backward →
   SGD step. The two alternate step by step after ``--warmup`` steps each, so machine noise hits both alike.
   ``API-Net / plain`` is the price of the pairwise interaction.
2. **Pair mining** alone on the backbone's features (ms per call): ``zoo.finegrained.api_net.mine_pairs`` (torch,
   on the features' device) against the official code's approach (``get_pairs`` in PeiqinZhuang/API-Net: copy the
   distance matrix to NumPy, mask with ``inf``, ``argmin`` per row, copy the pairs back), re-implemented here for
   timing only; both must return the same pairs.
3. **Balanced sampler, one epoch over ``--sampler-items`` indices** (default 1,000,000 images of 1,000 classes, 30
   classes × 4 images per batch): ``datamodules.sampler.BalancedClassSampler`` (tensor ops at epoch start) against
   the official ``BalancedBatchSampler``'s per-batch Python loop (``np.random.choice`` of classes, then per-class
   index lists consumed in order and reshuffled on wrap), re-implemented here for timing only.

    python bench/finegrained.py [--backbone resnet18] [--image-size 112] [--classes 10] [--per-class 10]
                                [--steps 10] [--warmup 2] [--threads N] [--device cpu|cuda] [--sampler-items 1000000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.sampler import BalancedClassSampler  # noqa: E402
from zoo.backbones import TimmBackbone  # noqa: E402
from zoo.finegrained.api_net import APINet, mine_pairs  # noqa: E402


def official_style_pairs(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's mining: NumPy on the host, ``inf`` masks, row-wise ``argmin`` (for timing only)."""
    distances = torch.cdist(features.detach(), features.detach()).square().cpu().numpy()
    y = labels.cpu().numpy().reshape(-1, 1)
    same = y == y.T
    np.fill_diagonal(same, False)
    intra_d = distances.copy()
    intra_d[~same] = np.inf
    np.fill_diagonal(same, True)
    inter_d = distances.copy()
    inter_d[same] = np.inf
    index = np.arange(len(y))
    first = np.concatenate([index, index])
    second = np.concatenate([intra_d.argmin(1), inter_d.argmin(1)])
    return torch.from_numpy(first).to(features.device), torch.from_numpy(second).to(features.device)


def official_style_sampler_epoch(labels: np.ndarray, n_classes: int, n_samples: int, seed: int = 0) -> list[list[int]]:
    """Per-batch Python loop of the official ``BalancedBatchSampler`` (for timing only)."""
    rng = np.random.default_rng(seed)
    label_set = np.unique(labels)
    by_label = {c: np.nonzero(labels == c)[0] for c in label_set}
    for c in label_set:
        rng.shuffle(by_label[c])
    used = {c: 0 for c in label_set}
    batches, count, batch_size = [], 0, n_classes * n_samples
    while count + batch_size < len(labels):
        batch: list[int] = []
        for c in rng.choice(label_set, n_classes, replace=False):
            batch.extend(by_label[c][used[c] : used[c] + n_samples].tolist())
            used[c] += n_samples
            if used[c] + n_samples > len(by_label[c]):
                rng.shuffle(by_label[c])
                used[c] = 0
        batches.append(batch)
        count += batch_size
    return batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_steps(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    num_classes = 200
    model = APINet(backbone=TimmBackbone(args.backbone), num_classes=num_classes, freeze_epochs=0).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    labels = torch.arange(args.classes, device=device).repeat_interleave(args.per_class)
    images = torch.randn(len(labels), 3, args.image_size, args.image_size, device=device)

    def plain() -> None:
        loss = F.cross_entropy(model.fc(model.dropout(model.features(images))), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def api_net() -> None:
        loss = model.pair_forward(images, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    times: dict[str, list[float]] = {"plain": [], "api_net": []}
    for step in range(args.warmup + args.steps):
        for name, fn in (("plain", plain), ("api_net", api_net)):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)

    with torch.no_grad():
        features = model.features(images).float()
    zoo_pairs, official_pairs = mine_pairs(features, labels), official_style_pairs(features, labels)
    assert all(torch.equal(a, b) for a, b in zip(zoo_pairs, official_pairs)), "mining implementations disagree"
    mining: dict[str, list[float]] = {"zoo": [], "official": []}
    for _ in range(args.warmup + 50):
        for name, fn in (("zoo", mine_pairs), ("official", official_style_pairs)):
            _sync(device)
            start = time.perf_counter()
            fn(features, labels)
            _sync(device)
            mining[name].append(time.perf_counter() - start)
    median = lambda xs: float(np.median(xs)) * 1e3  # noqa: E731
    return {"plain": median(times["plain"]), "api_net": median(times["api_net"]),
            "mine_zoo": median(mining["zoo"][args.warmup:]), "mine_official": median(mining["official"][args.warmup:]),
            "dim": features.shape[1]}


def bench_sampler(args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, args.sampler_items)
    sampler = BalancedClassSampler(torch.from_numpy(labels), 30, 4, seed=0)
    start = time.perf_counter()
    zoo_batches = sum(1 for _ in sampler)
    zoo_s = time.perf_counter() - start
    start = time.perf_counter()
    official_batches = len(official_style_sampler_epoch(labels, 30, 4))
    official_s = time.perf_counter() - start
    return {"zoo_s": zoo_s, "official_s": official_s, "zoo_batches": zoo_batches, "official_batches": official_batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sampler-items", type=int, default=1_000_000)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"backbone {args.backbone} @ {args.image_size}px, batch {args.classes}×{args.per_class}")

    steps = bench_steps(args, device)
    print("\n| training step (median ms) | plain classifier | API-Net | API-Net / plain |")
    print("|---|---|---|---|")
    print(f"| {args.backbone}, batch {args.classes * args.per_class} | {steps['plain']:.1f} | {steps['api_net']:.1f} "
          f"| {steps['api_net'] / steps['plain']:.2f} |")
    print(f"\n| pair mining (median ms, D={steps['dim']}) | zoo (torch) | official style (NumPy) | official / zoo |")
    print("|---|---|---|---|")
    print(f"| batch {args.classes * args.per_class} | {steps['mine_zoo']:.3f} | {steps['mine_official']:.3f} "
          f"| {steps['mine_official'] / steps['mine_zoo']:.2f} |")

    sampler = bench_sampler(args)
    print(f"\n| sampler, one epoch of {args.sampler_items:,} indices (30×4) | zoo | official loop | official / zoo |")
    print("|---|---|---|---|")
    print(f"| seconds (batches: {sampler['zoo_batches']} / {sampler['official_batches']}) | {sampler['zoo_s']:.2f} "
          f"| {sampler['official_s']:.2f} | {sampler['official_s'] / sampler['zoo_s']:.1f} |")
    print(f"\nload average during the run: {os.getloadavg()}")


if __name__ == "__main__":
    main()
