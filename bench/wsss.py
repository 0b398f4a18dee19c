"""PPC's training step against the CAM-only and SEAM steps at VOC's scale, and its contrast terms against the official
loops: time and peak memory, measured in one run.

    python bench/wsss.py [--threads 2] [--batch 2] [--crop 448] [--repeats 2] [--device cpu|cuda]

* one training step (forward of both views, backward, SGD step) of ``zoo.wsss.ppc.PPC`` on ImageNet-shaped ResNet-50
  at output stride 8 (timm, random weights), 448 crops and the 128 × 128 second view, 20 classes: CAM alone (the
  classification loss), SEAM (+ PCM, ER, ECR) and SEAM + PPC (+ the three contrast terms);
* the contrast terms alone at the official sizes (batch 8, 16 × 16 second-view maps, 21 prototypes, 128-d): the zoo's
  vectorised prototypes, pseudo labels and hard mining vs the same terms written as ``contrast_train.py`` loops them
  (a loop over classes for the prototypes, a per-pixel Python sampling of random negatives, a loop over classes for
  hard pixel sampling).

Peak memory: ``bench.measure`` (resident-set growth on CPU, ``max_memory_allocated`` on CUDA).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import measure  # noqa: E402
from zoo.backbones import TimmFeatures  # noqa: E402
from zoo.wsss.ppc import PPC, estimate_prototypes, info_nce, semi_hard_intra_nce  # noqa: E402

VARIANTS = {
    "CAM only": dict(use_pcm=False, use_er=False, use_min_pool=False, use_cross_proto=False, use_cross_cam=False,
                     use_intra=False),
    "SEAM (PCM, ER, ECR)": dict(use_cross_proto=False, use_cross_cam=False, use_intra=False),
    "SEAM + PPC": dict(),
}


def official_contrast(f1, f2, s1, s2, pl1, pl2, tau: float = 0.1) -> torch.Tensor:
    """``contrast_train.py``'s prototypes and the three terms, its loops kept (prototypes per class, random negatives
    drawn per pixel with ``random.sample``, hard pixels per class)."""
    def prototypes(scores, feats):
        c, d = scores.shape[1], feats.shape[1]
        flat = feats.permute(0, 2, 3, 1).reshape(-1, d)
        top_v, top_i = torch.topk(scores.transpose(0, 1).reshape(c, -1), k=scores.shape[2] * scores.shape[3] // 8)
        protos = torch.zeros(c, d)
        for i in range(c):
            protos[i] = (top_v[i].unsqueeze(-1) * flat[top_i[i]]).sum(0) / top_v[i].sum()
        return F.normalize(protos, dim=-1)

    p1, p2 = prototypes(s1, f1.detach()), prototypes(s2, f2.detach())
    e1 = F.normalize(f1.permute(0, 2, 3, 1).reshape(-1, f1.shape[1]), dim=-1)
    e2 = F.normalize(f2.permute(0, 2, 3, 1).reshape(-1, f2.shape[1]), dim=-1)

    def nce(e, pos, protos):
        a1 = torch.exp((e * protos[pos]).sum(-1) / tau)
        a2 = torch.exp(e @ protos.t() / tau).sum(-1)
        return torch.mean(-torch.log(a1 / a2))

    def intra(e, pl, protos):
        n = len(e)
        pos = protos[pl]
        similarity = ((e * pos).sum(-1) + 1) / 2
        a1 = torch.exp((e * pos).sum(-1) / tau)
        neg_scores = e @ protos.t()
        with torch.no_grad():
            _ = torch.tensor([random.sample(range(protos.shape[0]), 10) for _ in range(n)]).long()  # drawn, unused
            lower = torch.topk(neg_scores, k=13, dim=-1).indices[:, 3:]
        repeated = protos.unsqueeze(0).repeat(n, 1, 1)
        negs = torch.cat([pos.unsqueeze(1), repeated[torch.arange(n).unsqueeze(1), lower]], 1)
        a2 = torch.exp((e.unsqueeze(1) @ negs.transpose(1, 2)).squeeze(1) / tau).sum(-1)
        total, classes = torch.zeros(()), 0
        for c in pl.unique().tolist():
            classes += 1
            members = (pl == c).nonzero().flatten()
            k = len(members)
            if k < 2:
                continue
            rand = members[torch.tensor(random.sample(range(k), k // 2)).long()]
            lowest = torch.topk(similarity[members], k=int(k * 0.6), largest=False).indices
            low = members[lowest[int(k * 0.6) - k // 2:]]
            chosen = torch.cat([rand, low])
            total = total + torch.mean(-torch.log(a1[chosen] / a2[chosen]))
        return total / classes

    return 0.1 * ((nce(e1, pl1, p2) + nce(e2, pl2, p1)) / 2 + (nce(e1, pl2, p1) + nce(e2, pl1, p2)) / 2
                  + (intra(e1, pl1, p1) + intra(e2, pl2, p2)) / 2)


def zoo_contrast(f1, f2, s1, s2, pl1, pl2, tau: float = 0.1) -> torch.Tensor:
    k = s1.shape[2] * s1.shape[3] // 8
    p1, p2 = estimate_prototypes(s1, f1, k), estimate_prototypes(s2, f2, k)
    e1 = F.normalize(f1.permute(0, 2, 3, 1).flatten(0, 2), dim=-1)
    e2 = F.normalize(f2.permute(0, 2, 3, 1).flatten(0, 2), dim=-1)
    generator = torch.Generator().manual_seed(0)
    return 0.1 * ((info_nce(e1, pl1, p2, tau).mean() + info_nce(e2, pl2, p1, tau).mean()) / 2
                  + (info_nce(e1, pl2, p1, tau).mean() + info_nce(e2, pl1, p2, tau).mean()) / 2
                  + (semi_hard_intra_nce(e1, pl1, p1, tau, generator=generator)
                     + semi_hard_intra_nce(e2, pl2, p2, tau, generator=generator)) / 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch}, crop {args.crop}, torch "
          f"{torch.__version__}")

    print("\none training step, ResNet-50 at output stride 8, 20 classes:")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.crop, args.crop, generator=generator).to(device)
    labels = (torch.rand(args.batch, 20, generator=generator) < 0.15).float()
    labels[:, 0] = 1
    labels = labels.to(device)
    results = {}
    for name, flags in VARIANTS.items():
        torch.manual_seed(0)
        backbone = TimmFeatures("resnet50", out_indices=(2, 3, 4), output_stride=8, pretrained=False)
        model = PPC(backbone, num_classes=20, second_view_size=128, **flags).to(device)
        optimizer = torch.optim.SGD(model.parameter_groups(), lr=0.01)

        def step() -> float:
            losses = model.training_losses(images, labels)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            return float(losses["loss"])

        ms, peak, _ = measure(step, args.repeats, device, warmup=1)
        results[name] = (ms, peak)
        print(f"  {name:22s} {ms:9.0f} ms/step   peak +{peak:7.0f} MiB")
    cam, ppc = results["CAM only"], results["SEAM + PPC"]
    seam = results["SEAM (PCM, ER, ECR)"]
    print(f"  ratios: PPC / CAM time {ppc[0] / cam[0]:.2f}, memory {ppc[1] / max(cam[1], 1):.2f}; "
          f"PPC / SEAM time {ppc[0] / seam[0]:.2f}, memory {ppc[1] / max(seam[1], 1):.2f}")

    print("\nthe contrast terms alone (batch 8, 16 × 16 maps, 21 prototypes, 128-d), forward + backward:")
    g = torch.Generator().manual_seed(1)
    f1 = F.relu(torch.randn(8, 128, 16, 16, generator=g)).requires_grad_()
    f2 = F.relu(torch.randn(8, 128, 16, 16, generator=g)).requires_grad_()
    s1, s2 = torch.rand(8, 21, 16, 16, generator=g), torch.rand(8, 21, 16, 16, generator=g)
    s1[:, 0] = s2[:, 0] = 0.2
    pl1, pl2 = s1.argmax(1).flatten(), s2.argmax(1).flatten()
    timings = {}
    for name, fn in (("zoo (vectorised)", zoo_contrast), ("official loops", official_contrast)):
        def run(fn=fn) -> None:
            fn(f1, f2, s1, s2, pl1, pl2).backward()

        ms, peak, _ = measure(run, 10, torch.device("cpu"), warmup=2)
        timings[name] = ms
        print(f"  {name:22s} {ms:9.1f} ms   peak +{peak:5.0f} MiB")
    print(f"  ratio official / zoo: {timings['official loops'] / timings['zoo (vectorised)']:.1f}×")


if __name__ == "__main__":
    main()
