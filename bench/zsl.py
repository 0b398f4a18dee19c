"""Bi-VAEGAN at xlsa17 scale: one training iteration and the final classifier, time and peak memory.

    python bench/zsl.py [--threads 2] [--repeats 3] [--hidden 4096]

CUB's shape: 2048-d features, 312 attributes, 200 classes (150 seen / 50 unseen), batch 64, hidden 4096, 7057 trainval
and 2967 unlabelled unseen features (random, on the sphere). Measured, in one run:

* one full iteration (5 D_A + 5 R steps every 5th iteration, averaged in as 1/5; 5 D_s + D_u steps; the E+G step),
  beside the same iteration written as a plain PyTorch loop over the same networks and optimisers (no Lightning, no
  ``requires_grad`` toggles, no logging; the D_A/R block is added to both as measured once);
* synthesising syn_num = 400 features for each of the 50 unseen classes: one batched generator call vs a loop over
  classes (the official ``generate_syn_feature`` loops);
* the final classifier: 25 epochs on the 20 000 synthetic vha features.

Peak memory is the process's maximum resident set size (CPU) or ``torch.cuda.max_memory_allocated`` (GPU).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.zsl.bi_vaegan import (BiVAEGAN, gradient_penalty, synthesize, train_linear_classifier,  # noqa: E402
                               vae_loss, w1_regression_loss)


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
    attributes_dev = model.attributes

    def iteration() -> None:
        # one regular iteration plus 1/5 of the every-5th D_A and R steps, run at the iteration's start
        model.iterations_done.fill_(1)
        model.training_step(None, 0)

    def regressor_block() -> None:
        for _ in range(5):
            model.attribute_critic_step(rng)
        for _ in range(5):
            model.regressor_step(rng, True)

    opt = dict(zip(model._optimizer_names, optimizers))
    E, G, D_s, D_u, R = model.encoder, model.generator, model.critic_seen, model.critic_unseen, model.regressor
    x_all, y_all, u_all = model.train_features, model.train_labels, model.unseen_features
    prior, unseen = model.prior, model.unseen_classes

    def raw_iteration() -> None:
        # The official loop written out in plain PyTorch on the same networks (no Lightning, no requires_grad
        # toggling, no logging): 5 critic steps of D_s and D_u, then the E+G step, with CUB's weights.
        def draw() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            rows = torch.randint(len(y_all), (64,), device=device)
            picks = unseen[torch.multinomial(prior, 64, replacement=True)]
            return x_all[rows], attributes_dev[y_all[rows]], u_all[torch.randint(len(u_all), (64,), device=device)], \
                attributes_dev[picks]

        for _ in range(5):
            x, a, x_u, a_u = draw()
            with torch.no_grad():
                mean, log_var = E(x, a)
                fake = G(mean + torch.randn_like(mean) * torch.exp(0.5 * log_var), a)
                fake_u = G(torch.randn(64, attribute_dim, device=device), a_u)
            loss = 10 * (D_s(fake, a).mean() - D_s(x, a).mean() + 10 * gradient_penalty(lambda v: D_s(v, a), x, fake, 1.0))
            loss = loss + 1000 * (D_u(fake_u).mean() - D_u(x_u).mean() + 10 * gradient_penalty(D_u, x_u, fake_u, 1.0))
            opt["critic_seen"].zero_grad(set_to_none=True)
            opt["critic_unseen"].zero_grad(set_to_none=True)
            loss.backward()
            opt["critic_seen"].step()
            opt["critic_unseen"].step()
        x, a, _, a_u = draw()
        mean, log_var = E(x, a)
        recon = G(mean + torch.randn_like(mean) * torch.exp(0.5 * log_var), a)
        fake_u = G(torch.randn(64, attribute_dim, device=device), a_u)
        loss = (vae_loss(recon, x, mean, log_var) - 10 * D_s(recon, a).mean() - 10 * D_u(fake_u).mean()
                + 10 * w1_regression_loss(R(fake_u), a_u))
        for name in ("encoder", "generator"):
            opt[name].zero_grad(set_to_none=True)
        loss.backward()
        for name in ("encoder", "generator"):
            opt[name].step()

    # Alternated and the median kept: measured one after the other, whichever ran first paid for the allocator's
    # growth at hidden 4096 and looked twice as slow.
    t_block = _timed(regressor_block, 1, device) / 5
    zoo_times, raw_times = [], []
    for _ in range(args.repeats):
        zoo_times.append(_timed(iteration, 1, device))
        raw_times.append(_timed(raw_iteration, 1, device))
    t_iter = statistics.median(zoo_times) + t_block
    t_raw = statistics.median(raw_times) + t_block
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
    print(f"  training iteration (all critic steps + G step, D_A/R amortised): {1000 * t_iter:8.1f} ms; plain PyTorch loop "
          f"{1000 * t_raw:8.1f} ms; zoo / plain = {t_iter / t_raw:.2f} (medians of {args.repeats})")
    print(f"  synthesis of 50 × 400 features: batched {1000 * t_batched:8.1f} ms; loop over classes "
          f"{1000 * t_looped:8.1f} ms; loop / batched = {t_looped / t_batched:.2f}")
    print(f"  final classifier (vha {vha.shape[1]}-d, 20 000 samples, 25 epochs): {t_classifier:.2f} s")
    print(f"  peak memory: {_peak_mb(device):.0f} MB")


if __name__ == "__main__":
    main()
