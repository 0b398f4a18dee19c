"""LabelPooling's cost at ImageNet scale, against the ResNet-50 training step it is paid in, measured in one run.

The paper reports LabelPooling at about 0.5 % of the training time (Yun et al. 2021, §4). Measured here:

1. **LabelPooling** (ms per batch): ``zoo.classification.relabel.LabelPooling`` on ``B`` label maps of the released
   form (top-5 of 1,000 classes on a 15 × 15 grid, float32) and ``B`` crop boxes: densify (one ``scatter_``),
   ``torchvision.ops.roi_align`` to 1 × 1 (one call for the whole batch), softmax; under ``no_grad``, on the device.
2. **ResNet-50 training step** (ms per batch): torchvision's ``resnet50`` (1,000 classes), forward + soft-target
   cross-entropy + backward + SGD step on ``B_r`` random 224 × 224 images, the same device.
3. **ratio** = LabelPooling / ResNet-50 step, per image (the two batch sizes may differ on a CPU, where a
   ResNet-50 step of 256 images takes minutes; both costs are linear in the batch).

    python bench/relabel.py [--batch 256] [--resnet-batch 256|32 on CPU] [--repeats 5] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import measure  # noqa: E402

from zoo.classification.relabel import LabelPooling, label_map_from_scores, soft_target_cross_entropy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--resnet-batch", type=int, default=None, help="default: --batch on CUDA, 32 on CPU")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--grid", type=int, default=15)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    resnet_batch = args.resnet_batch or (args.batch if device.type == "cuda" else 32)
    torch.manual_seed(0)

    label_maps = label_map_from_scores(torch.randn(args.batch, args.classes, args.grid, args.grid) * 5,
                                       args.top_k).to(device)
    corner = torch.rand(args.batch, 2) * 0.6
    boxes = torch.cat([corner, corner + 0.2 + torch.rand(args.batch, 2) * 0.2], 1).to(device)
    labels = torch.randint(args.classes, (args.batch,), device=device)
    pooling = LabelPooling(args.classes, "localized")
    pool_ms, pool_mib, targets = measure(lambda: pooling(labels, boxes, label_maps), args.repeats, device, warmup=2)

    from torchvision.models import resnet50  # noqa: PLC0415

    model = resnet50(num_classes=args.classes).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    images = torch.randn(resnet_batch, 3, 224, 224, device=device)
    soft = targets[:resnet_batch] if resnet_batch <= args.batch else targets.repeat(
        resnet_batch // args.batch + 1, 1)[:resnet_batch]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        soft_target_cross_entropy(model(images), soft).backward()
        optimizer.step()

    step_ms, step_mib, _ = measure(step, max(2, args.repeats // 2), device, warmup=1)
    per_image_pool, per_image_step = pool_ms / args.batch, step_ms / resnet_batch
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"{'':34s}{'batch':>7s}{'ms/batch':>11s}{'ms/image':>10s}{'peak MiB':>10s}")
    print(f"{'LabelPooling (top-5, 15x15, 1000)':34s}{args.batch:7d}{pool_ms:11.2f}{per_image_pool:10.4f}"
          f"{pool_mib:10.1f}")
    print(f"{'ResNet-50 training step (224 px)':34s}{resnet_batch:7d}{step_ms:11.1f}{per_image_step:10.3f}"
          f"{step_mib:10.1f}")
    print(f"ratio LabelPooling / ResNet-50 step, per image: {per_image_pool / per_image_step:.4%} "
          "(the paper: about 0.5 % of the training time)")


if __name__ == "__main__":
    main()
