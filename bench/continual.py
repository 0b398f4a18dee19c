"""What ANCL's auxiliary network costs, and the Fisher vectorised over the batch, at CIFAR-100 scale.

    python bench/continual.py [--threads 1] [--batch 128] [--steps 3] [--device cpu|cuda]

One task phase of every method is a number of training steps of FACIL's ResNet-32 on a 10-class task (32 × 32
images, batch 128, the ANCL scripts' sizes) at task ``t = 1``, with the regulariser and the frozen networks in
place. Per task (``S`` steps per epoch):

* LwF:   S × (forward/backward + the old network's forward)
* A-LwF: S × forward/backward (the auxiliary phase) + S × (forward/backward + old and auxiliary forwards)
* EWC:   S × (forward/backward + the quadratic penalty) + the Fisher on the task's data
* A-EWC: S × forward/backward (auxiliary phase) + the auxiliary Fisher + S × (forward/backward + two penalties)
         + the Fisher

The printed ratios are per training step and per task (all epochs plus the Fisher passes), measured in one run.
The Fisher: ``per_sample`` (``torch.func.vmap`` of per-sample gradients, the zoo's default) against a Python loop
over the samples computing the same numbers, and against FACIL's batch approximation.
"""

from __future__ import annotations

import argparse
import warnings
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import measure  # noqa: E402
from zoo.backbones import CifarResNet  # noqa: E402
from zoo.continual.ancl import AEWC, ALwF  # noqa: E402
from zoo.continual.ewc import EWC, fisher_sums  # noqa: E402
from zoo.continual.lwf import LwF  # noqa: E402


def build(cls, device):
    torch.manual_seed(0)
    model = cls(backbone=CifarResNet(32), task_classes=[10] * 10).to(device)
    with torch.no_grad():
        model.old_net.load_state_dict(model.net.state_dict())
        if hasattr(model, "aux_net"):
            model.aux_net.load_state_dict(model.net.state_dict())
        if hasattr(model, "fisher"):
            model.fisher.uniform_(0, 1e-3)
        if hasattr(model, "fisher_aux"):
            model.fisher_aux.uniform_(0, 1e-3)
    model.train()
    return model


def step_fn(model, images, labels, task: int, with_penalty: bool):
    optimizer = torch.optim.SGD(model.net.parameters(), lr=0.01, momentum=0.9)

    def step():
        outputs = model.net(images, num_heads=task + 1)
        loss = F.cross_entropy(outputs[task], labels)
        if with_penalty:
            loss = loss + model.penalty(images, outputs, task)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed repeats per measurement")
    parser.add_argument("--task-images", type=int, default=4500, help="training images of a task (CIFAR-100/10: 4500)")
    parser.add_argument("--fisher-images", type=int, default=256, help="images the Fisher timings run on")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = torch.randn(args.batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)  # head-local targets of task 1
    task = 1

    print(f"ResNet-32, batch {args.batch}, task {task}, {device}, {args.threads} thread(s)")
    step_ms = {}
    for name, cls in (("LwF", LwF), ("A-LwF", ALwF), ("EWC", EWC), ("A-EWC", AEWC)):
        model = build(cls, device)
        step_ms[name], _, _ = measure(step_fn(model, images, labels, task, True), args.steps, device, warmup=1)
        if name == "LwF":
            step_ms["plain"], _, _ = measure(step_fn(model, images, labels, task, False), args.steps, device,
                                             warmup=1)
    fisher_batches = [(images[i: i + args.batch // 4], labels[i: i + args.batch // 4])
                      for i in range(0, args.batch, args.batch // 4)]
    net = build(EWC, device).net
    per_sample_ms, per_sample_mib, (vmapped, count) = measure(
        lambda: fisher_sums(net, fisher_batches, 2, per_sample=True, device=device), args.steps, device, warmup=1)

    def loop_over_samples():
        net.eval()
        params = list(net.backbone.parameters())
        total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=device)
        for x, y in fisher_batches:
            for i in range(len(y)):
                loss = F.cross_entropy(torch.cat(net(x[i: i + 1], num_heads=2), 1), y[i: i + 1])
                total += torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double().pow(2)
        return total

    loop_ms, loop_mib, looped = measure(loop_over_samples, max(1, args.steps // 2), device, warmup=0)
    batch_ms, batch_mib, _ = measure(lambda: fisher_sums(net, fisher_batches, 2, per_sample=False, device=device),
                                     args.steps, device, warmup=1)
    largest_gap = float((vmapped - looped).abs().max() / looped.abs().max())  # float32 noise on tiny entries

    steps_per_epoch = -(-args.task_images // args.batch)
    fisher_per_image = per_sample_ms / args.batch
    print("\n| method | ms / step | step vs plain | step vs its base | task time vs its base (1 / 200 epochs per task) |")
    print("|---|---|---|---|---|")
    for name, base in (("LwF", None), ("A-LwF", "LwF"), ("EWC", None), ("A-EWC", "EWC")):
        ms = step_ms[name]
        row = f"| {name} | {ms:.0f} | {ms / step_ms['plain']:.2f}× | "
        if base is None:
            row += "- | - |"
        else:
            fisher = args.task_images * fisher_per_image if name == "A-EWC" else 0.0  # one Fisher pass per task

            def task_ms(epochs: int, aux: bool) -> float:
                if aux:  # auxiliary phase (plain steps) + heavier main steps + the base's and the auxiliary Fisher
                    return epochs * steps_per_epoch * (step_ms["plain"] + ms) + 2 * fisher
                return epochs * steps_per_epoch * step_ms[base] + fisher

            row += (f" {ms / step_ms[base]:.2f}× | {task_ms(1, True) / task_ms(1, False):.2f}× / "
                    f"{task_ms(200, True) / task_ms(200, False):.2f}× |")
        print(row)
    print(f"\nFisher over {args.batch} images (4 batches of {args.batch // 4}), backbone only:")
    print(f"  per-sample, torch.func.vmap : {per_sample_ms:8.0f} ms  peak +{per_sample_mib:.0f} MiB")
    print(f"  per-sample, Python loop     : {loop_ms:8.0f} ms  peak +{loop_mib:.0f} MiB   "
          f"(vmap {loop_ms / per_sample_ms:.1f}× faster; largest difference {largest_gap:.1e} of the largest entry)")
    print(f"  FACIL's batch approximation : {batch_ms:8.0f} ms  peak +{batch_mib:.0f} MiB")
    print(f"  Fisher of a {args.task_images}-image task ≈ {args.task_images * fisher_per_image / 1000:.0f} s "
          f"= {args.task_images * fisher_per_image / (steps_per_epoch * step_ms['EWC']):.2f} epochs of EWC training")


if __name__ == "__main__":
    main()
