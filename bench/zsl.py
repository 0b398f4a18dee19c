"""Bi-VAEGAN at xlsa17 scale: one training iteration and the final classifier, time and peak memory.

    python bench/zsl.py [--threads 2] [--repeats 3] [--hidden 4096]

CUB's shape: 2048-d features, 312 attributes, 200 classes (150 seen / 50 unseen), batch 64, hidden 4096, 7057 trainval
and 2967 unlabelled unseen features (random, on the sphere). Measured, in one run:

* one full iteration (5 D_A + 5 R steps every 5th iteration, averaged in as 1/5; 5 D_s + D_u steps; the E+G step),
  beside the same iteration with the optimiser bookkeeping of the raw PyTorch loop (``raw``: the networks called
  directly with plain ``loss.backward()``; the zoo's ``training_step`` adds only ``requires_grad`` toggles);
* synthesising syn_num = 400 features for each of the 50 unseen classes: one batched generator call vs a loop over
  classes (the official ``generate_syn_feature`` loops);
* the final classifier: 25 epochs on the 20 000 synthetic vha features.

Peak memory is the process's maximum resident set size (CPU) or ``torch.cuda.max_memory_allocated`` (GPU).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.zsl.bi_vaegan import BiVAEGAN, synthesize, train_linear_classifier  # noqa: E402


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    classes, seen, attribute_dim = 200, 150, 312
    attributes = torch.nn.functional.normalize(torch.rand(classes, attribute_dim), dim=1)
    train_labels = torch.randint(seen, (7057,))
    data = SimpleNamespace(
        attributes=attributes, seen_classes=torch.arange(seen), unseen_classes=torch.arange(seen, classes),
        train_features=torch.nn.functional.normalize(torch.randn(7057, 2048), dim=1), train_labels=train_labels,
        unseen_features=torch.nn.functional.normalize(torch.randn(2967, 2048), dim=1),
        unseen_class_counts=torch.full((classes - seen,), 59))
    model = BiVAEGAN(feature_dim=2048, attribute_dim=attribute_dim, hidden=args.hidden, syn_num=400).to(device)
    model.bind_data(data)
    model._on_device()
    optimizers = model.configure_optimizers()
    model.optimizers = lambda: optimizers
    model.manual_backward = lambda loss: loss.backward()
    model.log = lambda *a, **k: None
    rng = model.rng(0)

    def iteration() -> None:
        # one regular iteration plus 1/5 of the every-5th D_A and R steps, run at the iteration's start
        model.iterations_done.fill_(1)
        model.training_step(None, 0)

    def regressor_block() -> None:
        for _ in range(5):
            model.attribute_critic_step(rng)
        for _ in range(5):
            model.regressor_step(rng, True)

    def raw_iteration() -> None:
        # the same five critic steps and generator step, written as a plain loop without the module's bookkeeping
        for _ in range(5):
            model.critic_step(rng, True)
        model.generator_step(rng, True)

    t_iter = _timed(iteration, args.repeats, device) + _timed(regressor_block, 1, device) / 5
    t_raw = _timed(raw_iteration, args.repeats, device) + _timed(regressor_block, 1, device) / 5
    model.eval()
    t_batched = _timed(lambda: synthesize(model.generator, model.attributes, model.unseen_classes, 400, attribute_dim,
                                          False, rng), args.repeats, device)

    def looped() -> None:
        for c in model.unseen_classes:
            synthesize(model.generator, model.attributes, c.view(1), 400, attribute_dim, False, rng)

    t_looped = _timed(looped, args.repeats, device)
    features, labels = synthesize(model.generator, model.attributes, model.unseen_classes, 400, attribute_dim, False, rng)
    vha = model.classifier_input(features)
    start = time.perf_counter()
    train_linear_classifier(vha, labels - seen, classes - seen, 25, 1e-3, 400, rng)
    t_classifier = time.perf_counter() - start
    print(f"device {device}, threads {args.threads}, hidden {args.hidden}, CUB shape (2048-d, 312 att, 150/50 classes)")
    print(f"  training iteration (all critic steps + G step, D_A/R amortised): {1000 * t_iter:8.1f} ms; raw loop "
          f"{1000 * t_raw:8.1f} ms; zoo / raw = {t_iter / t_raw:.2f}")
    print(f"  synthesis of 50 × 400 features: batched {1000 * t_batched:8.1f} ms; loop over classes "
          f"{1000 * t_looped:8.1f} ms; loop / batched = {t_looped / t_batched:.2f}")
    print(f"  final classifier (vha {vha.shape[1]}-d, 20 000 samples, 25 epochs): {t_classifier:.2f} s")
    print(f"  peak memory: {_peak_mb(device):.0f} MB")


if __name__ == "__main__":
    main()
