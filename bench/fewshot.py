"""Few-shot training speed, measured in one run: zoo's ProtoNet against easyfsl's, and MAML first vs second order.

1. **ProtoNet, zoo vs easyfsl** (training episodes per second, higher is better). Both sides train Prototypical
   Networks with the same Conv-4 (``zoo.backbones.ConvNet(in_chans=1)``, 64-d at 28×28, identical initial weights),
   the same episode shape (default 5-way 5-shot 15-query), Adam(lr=1e-3), the same number of warm-up and timed
   episodes, drawn from the same in-memory dataset: the procedural glyphs of ``datamodules.generated.fewshot_glyphs`` decoded once by
   ``GlyphsDataModule(cache=True)`` into ``(images (M, 1, 28, 28) float, labels (M,))`` (random tensors of the same
   shape if the glyph writer fails; the output says which), so no disk or decoding cost is timed on either side.

   - *zoo*: the real zoo path, ``lightning.Trainer(max_steps=...)`` fitting ``zoo.fewshot.protonet.ProtoNet`` on a
     DataLoader built from zoo's ``EpisodicBatchSampler`` + ``EpisodeCollate`` (what ``GlyphsDataModule`` builds),
     including everything ``training_step`` does (one backbone pass over support + query, ``train/loss`` and
     ``train/acc`` logging).
   - *easyfsl* (1.5.0): its ``TaskSampler`` + ``episodic_collate_fn`` and ``PrototypicalNetworks(nn.Sequential(conv4,
     nn.Flatten()))`` in the plain loop of its notebooks (``process_support_set``; ``model(query)``; cross-entropy;
     backward; step; ``loss.item()``).

   The ``--episodes`` timed episodes of each side are split over ``--repeats`` runs; every run starts both sides
   from the same weights and warms up for ``--warmup`` episodes. So that machine noise (a shared 2-core box) hits
   both sides alike, the default ``--schedule interleaved`` runs one easyfsl episode inside a callback after every
   zoo training step, in the same Lightning fit: a zoo step is timed from one ``on_train_batch_start`` to the next
   (all of Lightning's per-step work: fetching the next episode, hooks, logging, the optimizer closure) minus the
   easyfsl episode, and an easyfsl episode (its loader's ``next`` included) is timed around its call.
   ``--schedule alternating`` instead runs whole runs back to back (easyfsl, zoo, easyfsl, zoo, ...), the zoo run
   timed by a callback from ``on_train_batch_start`` of the first timed episode to ``on_train_batch_end`` of the
   last. Reported: timed episodes / timed seconds over all runs of a side, and each run's rate.
   ``ratio zoo / easyfsl`` > 1 means zoo trains faster; < 1 means the zoo path costs that fraction more per episode.
   The "loader only" column iterates each side's DataLoader without training: the sampler + collate cost alone.
   On a machine where other processes are busy, use ``--threads 1``: with more OpenMP threads than idle cores every
   parallel op waits for a descheduled thread, which inflates per-op cost and penalises easyfsl's two backbone
   passes (twice the ops) far beyond their compute; the output ends with the load average seen during the run.
   The two methods are not numerically the same model: zoo uses *squared* Euclidean distance (Snell et al., Eq. 2),
   easyfsl the unsquared one, and zoo embeds support and query in one backbone pass whereas easyfsl makes two, so in
   training mode BatchNorm's batch statistics differ. The cross-check therefore compares the two in eval mode on one
   episode with the same weights: zoo's logits must equal −(easyfsl scores)² and the argmax must agree.

2. **MAML, first vs second order** (``zoo.fewshot.maml.MAML``, Conv-4, 28×28, default 5-way 5-shot 15-query,
   ``tasks_per_step=1``, inner lr 0.4 as in ``configs/fewshot/maml_glyphs.yaml``): time per meta-update (ms, lower
   is better) and peak memory of ``adapted_query_logits`` → cross-entropy → ``backward`` → Adam step, called
   directly in a plain loop, for ``first_order=True`` and ``False`` and every ``--inner-steps`` value. Each
   configuration runs in a fresh subprocess so that peak memory is its own: on CPU the peak resident set size
   during the steps minus the RSS after model and data creation (before the first step), read as Linux's ``VmHWM``
   after resetting it through ``/proc/self/clear_refs`` (``ru_maxrss`` cannot be used as is: a child inherits its
   parent's high-water mark across ``exec``, so it would read the parent's peak; it is the fallback off Linux); on
   CUDA ``torch.cuda.max_memory_allocated`` over the allocation before the first step. ``SO/FO`` is second order
   divided by first order, for time and for memory: the price of back-propagating through the inner updates.

    python bench/fewshot.py [--episodes 120] [--warmup 10] [--repeats 2] [--schedule interleaved|alternating]
                            [--n-way 5] [--k-shot 5] [--n-query 15]
                            [--threads N] [--device cpu|cuda] [--inner-steps 1 5] [--maml-steps 10]
                            [--skip-protonet] [--skip-maml]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.fewshot import EpisodeCollate, EpisodicBatchSampler
from zoo.backbones import ConvNet

SEED = 0
FEATURE_DIM = 64  # Conv-4 at 28×28: 64 channels × 1 × 1
MAML_INNER_LR = 0.4  # configs/fewshot/maml_glyphs.yaml


# ---------------------------------------------------------------------------------------------------------- data
class EpisodeData(Dataset):
    """Decoded images in memory, ``(image (1, 28, 28) float, label int)`` items; ``get_labels`` for easyfsl."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        self._labels = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self._labels[i]

    def get_labels(self) -> list[int]:
        return list(self._labels)


def load_glyphs(root: str) -> tuple[EpisodeData, str]:
    """Base-class glyphs decoded by the zoo's own loader (28×28 grey, inverted, float), or random stand-ins."""
    try:
        from datamodules.fewshot import GlyphsDataModule

        dm = GlyphsDataModule(root=root, background_alphabets=8, evaluation_alphabets=1, characters_per_alphabet=15,
                              drawers=20, val_alphabets=1, cache=True)
        dm.setup("fit")
        items = [dm.train_set[i] for i in range(len(dm.train_set))]
        images = torch.stack([image for image, _ in items]).contiguous()
        labels = torch.tensor([label for _, label in items])
        source = f"procedural glyphs (datamodules.generated.fewshot_glyphs, {root})"
    except Exception as err:  # the glyph writer is optional here: the timing only needs the shapes
        g = torch.Generator().manual_seed(SEED)
        classes, per_class = 105, 20
        images = torch.rand(classes * per_class, 1, 28, 28, generator=g)
        labels = torch.arange(classes).repeat_interleave(per_class)
        source = f"RANDOM tensors (glyphs unusable: {type(err).__name__}: {err})"
    return EpisodeData(images, labels), f"{source}: {len(labels)} images, {len(labels.unique())} classes"


def conv4_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(SEED)
    return copy.deepcopy(ConvNet(in_chans=1).state_dict())


def conv4(state: dict[str, torch.Tensor]) -> ConvNet:
    net = ConvNet(in_chans=1)
    net.load_state_dict(state)
    return net


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------------------------------------- ProtoNet
class EpisodeTimer(Callback):
    """Wall time from the start of training batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.start, self.end, self.steps = None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            synchronize(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            synchronize(self.device)
            self.end, self.steps = time.perf_counter(), self.steps + 1


def zoo_loader(dataset: EpisodeData, opts, episodes: int, seed: int) -> DataLoader:
    sampler = EpisodicBatchSampler(dataset.labels, opts.n_way, opts.k_shot, opts.n_query, episodes, seed=seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=EpisodeCollate(opts.n_way, opts.k_shot, opts.n_query))


class _AcceptDataSource(Sampler):
    """Takes the ``data_source`` argument that recent torch's ``Sampler`` no longer accepts (deprecated in 2.2)."""

    def __init__(self, data_source=None) -> None:
        pass


def easyfsl_task_sampler(dataset: EpisodeData, opts, episodes: int):
    """easyfsl's ``TaskSampler``, unchanged; 1.5.0 calls ``super().__init__(data_source=None)``, which current torch's
    ``Sampler`` rejects, so the shim above sits between it and ``Sampler`` in the MRO and swallows the argument."""
    from easyfsl.samplers import TaskSampler

    try:
        return TaskSampler(dataset, n_way=opts.n_way, n_shot=opts.k_shot, n_query=opts.n_query, n_tasks=episodes)
    except TypeError:
        compat = type("TaskSampler", (TaskSampler, _AcceptDataSource), {})
        return compat(dataset, n_way=opts.n_way, n_shot=opts.k_shot, n_query=opts.n_query, n_tasks=episodes)


def easyfsl_loader(dataset: EpisodeData, opts, episodes: int, seed: int) -> DataLoader:
    random.seed(seed)  # TaskSampler draws from Python's global `random`
    sampler = easyfsl_task_sampler(dataset, opts, episodes)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=sampler.episodic_collate_fn)


class EasyfslLoop:
    """easyfsl's episodic training loop (its notebooks' ``training_epoch``), one episode per ``step()``."""

    def __init__(self, dataset: EpisodeData, state: dict, opts, device: torch.device, seed: int, episodes: int):
        from easyfsl.methods import PrototypicalNetworks

        torch.manual_seed(seed)
        self.device = device
        self.model = PrototypicalNetworks(nn.Sequential(conv4(state), nn.Flatten())).to(device).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.batches = iter(easyfsl_loader(dataset, opts, episodes, seed))

    def step(self) -> None:
        support_images, support_labels, query_images, query_labels, _ = next(self.batches)
        self.model.process_support_set(support_images.to(self.device), support_labels.to(self.device))
        scores = self.model(query_images.to(self.device))
        loss = F.cross_entropy(scores, query_labels.to(self.device))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        loss.item()  # easyfsl's notebooks record the loss every episode (a sync on CUDA; zoo logs it too)


class Interleave(Callback):
    """Runs one easyfsl episode after every zoo training batch and times both.

    zoo's time for batch ``i`` is ``start[i+1] − start[i]`` minus the easyfsl episode run inside it, so it holds
    everything Lightning does per step (fetching the next episode, hooks, logging, the optimizer closure).
    """

    def __init__(self, partner: EasyfslLoop, device: torch.device) -> None:
        self.partner, self.device = partner, device
        self.starts: list[float] = []
        self.partner_times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        synchronize(self.device)
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        synchronize(self.device)
        t = time.perf_counter()
        self.partner.step()
        synchronize(self.device)
        self.partner_times.append(time.perf_counter() - t)

    def timed(self, first: int, count: int) -> tuple[float, float]:
        """(zoo seconds, easyfsl seconds) over batches ``first .. first + count − 1``."""
        zoo = sum(self.starts[i + 1] - self.starts[i] - self.partner_times[i] for i in range(first, first + count))
        return zoo, sum(self.partner_times[first : first + count])


def zoo_run(dataset: EpisodeData, state: dict, opts, device: torch.device, seed: int, root: str,
            interleave: bool) -> dict[str, tuple[int, float]]:
    """One Lightning fit of ``warmup + per_run`` timed episodes (with easyfsl's interleaved if asked).

    Returns ``{side: (timed episodes, seconds)}``.
    """
    import lightning as L

    from zoo.fewshot.protonet import ProtoNet

    total = opts.warmup + opts.per_run + (1 if interleave else 0)  # the next batch start closes the last interval
    partner = EasyfslLoop(dataset, state, opts, device, seed, total) if interleave else None
    timer = Interleave(partner, device) if interleave else EpisodeTimer(opts.warmup, device)
    torch.manual_seed(seed)
    model = ProtoNet(backbone=conv4(state), feature_dim=FEATURE_DIM, lr=1e-3)
    trainer = L.Trainer(max_steps=total, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator=device.type, devices=1,
                        callbacks=[timer], default_root_dir=root)
    trainer.fit(model, train_dataloaders=zoo_loader(dataset, opts, total, seed))
    if interleave:
        zoo_s, easyfsl_s = timer.timed(opts.warmup, opts.per_run)
        return {"zoo": (opts.per_run, zoo_s), "easyfsl": (opts.per_run, easyfsl_s)}
    assert timer.steps == opts.per_run, (timer.steps, opts.per_run)
    return {"zoo": (timer.steps, timer.end - timer.start)}


def easyfsl_run(dataset: EpisodeData, state: dict, opts, device: torch.device, seed: int) -> tuple[int, float]:
    """easyfsl's plain loop for ``warmup + per_run`` episodes; returns (timed episodes, seconds)."""
    loop = EasyfslLoop(dataset, state, opts, device, seed, opts.warmup + opts.per_run)
    for i in range(opts.warmup + opts.per_run):
        if i == opts.warmup:
            synchronize(device)
            start = time.perf_counter()
        loop.step()
    synchronize(device)
    return opts.per_run, time.perf_counter() - start


def easyfsl_version() -> str:
    from importlib.metadata import version

    return version("easyfsl")


def loader_only(loader: DataLoader, warmup: int) -> float:
    """Episodes per second of sampler + collate alone."""
    start, n = None, 0
    for i, _ in enumerate(loader):
        if i == warmup:
            start = time.perf_counter()
        elif start is not None:
            n += 1
    return n / (time.perf_counter() - start)


def cross_check(dataset: EpisodeData, state: dict, opts) -> list[str]:
    """Eval mode, same weights, same episode: zoo logits == −(easyfsl scores)², same argmax."""
    from easyfsl.methods import PrototypicalNetworks

    from zoo.fewshot.protonet import ProtoNet

    support, query, _ = next(iter(zoo_loader(dataset, opts, 1, SEED + 7)))
    zoo = ProtoNet(backbone=conv4(state), feature_dim=FEATURE_DIM)
    efsl = PrototypicalNetworks(nn.Sequential(conv4(state), nn.Flatten()))
    support_labels = torch.arange(opts.n_way).repeat_interleave(opts.k_shot)  # row i of the episode is class i
    lines = []
    for mode in ("eval", "train"):
        zoo.train(mode == "train"), efsl.train(mode == "train")
        with torch.no_grad():
            logits = zoo.episode_logits(support, query)
            efsl.process_support_set(support.flatten(0, 1), support_labels)
            scores = efsl(query.flatten(0, 1))
        expected = -scores.pow(2)
        diff = (logits - expected).abs().max().item()
        rel = diff / logits.abs().max().item()
        close = torch.allclose(logits, expected, rtol=1e-4, atol=1e-4 * logits.abs().max().item())
        same = bool((logits.argmax(1) == scores.argmax(1)).all())
        if mode == "eval":
            lines.append(f"cross-check (eval-mode BN, same weights, one {opts.n_way}-way {opts.k_shot}-shot episode): "
                         f"zoo logits == -(easyfsl scores)^2: {'OK' if close else 'FAILED'} (max |diff| {diff:.2e}, "
                         f"{rel:.1e} of max |logit|); argmax equal: {'OK' if same else 'FAILED'}")
            if not (close and same):
                lines.append("  !! the two ProtoNets disagree on the same weights and episode")
        else:
            lines.append(f"  (train-mode BN, for information: max |diff| {diff:.2e} = {rel:.1e} of max |logit|, "
                         f"argmax equal on {(logits.argmax(1) == scores.argmax(1)).float().mean().item() * 100:.0f}% "
                         f"of queries: zoo normalises support+query as one batch, easyfsl each separately)")
    return lines


def bench_protonet(opts, device: torch.device, dataset: EpisodeData, source: str) -> None:
    state = conv4_state()
    runs: dict[str, list[tuple[int, float]]] = {"easyfsl": [], "zoo": []}
    with tempfile.TemporaryDirectory() as root:
        for r in range(opts.repeats):
            if opts.schedule == "interleaved":
                for side, result in zoo_run(dataset, state, opts, device, SEED + r, root, True).items():
                    runs[side].append(result)
            else:
                runs["easyfsl"].append(easyfsl_run(dataset, state, opts, device, SEED + r))
                runs["zoo"].append(zoo_run(dataset, state, opts, device, SEED + r, root, False)["zoo"])
    loader_episodes = 10 + 10 * opts.per_run
    loader = {"zoo": loader_only(zoo_loader(dataset, opts, loader_episodes, SEED), 10),
              "easyfsl": loader_only(easyfsl_loader(dataset, opts, loader_episodes, SEED), 10)}
    rate = {name: sum(n for n, _ in r) / sum(t for _, t in r) for name, r in runs.items()}
    print(f"\n== ProtoNet training throughput: Conv-4, {opts.n_way}-way {opts.k_shot}-shot {opts.n_query}-query, "
          f"28x28x1, Adam(1e-3); per side {opts.repeats} runs of {opts.warmup} warm-up + {opts.per_run} timed "
          f"episodes, {opts.schedule}; {device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"easyfsl {easyfsl_version()}")
    print(f"data: {source}")
    print(f"{'':10s}{'episodes/s':>12s}{'ms/episode':>12s}{'per run (ep/s)':>20s}{'loader only (ep/s)':>20s}")
    for name in ("easyfsl", "zoo"):
        per_run = "  ".join(f"{n / t:.2f}" for n, t in runs[name])
        print(f"{name:10s}{rate[name]:12.2f}{1000 / rate[name]:12.1f}{per_run:>20s}{loader[name]:20.0f}")
    print(f"ratio zoo / easyfsl (episodes/s) = {rate['zoo'] / rate['easyfsl']:.3f}   (> 1: zoo faster; "
          f"{1000 / rate['zoo'] - 1000 / rate['easyfsl']:+.1f} ms/episode)")
    for line in cross_check(dataset, state, opts):
        print(line)


# ------------------------------------------------------------------------------------------------------ MAML
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> tuple[int, str]:
    """Reset the process's peak RSS where possible; return the baseline (KiB) and which counter is used.

    ``ru_maxrss`` of a child process starts at its *parent's* peak (the kernel carries the high-water mark across
    ``exec``), so here, where the parent holds the dataset and has run Lightning, it would hide the child's own peak.
    Linux can reset the high-water mark instead: writing 5 to ``/proc/self/clear_refs`` sets ``VmHWM`` to the current
    ``VmRSS``. Elsewhere, fall back to ``ru_maxrss``.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kib("VmRSS"), "VmHWM"
    except (OSError, KeyError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"  # KiB on Linux


def peak_rss(source: str) -> int:
    return _proc_status_kib("VmHWM") if source == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def maml_child(spec: dict) -> dict:
    """One MAML configuration, in its own process; returns ms/step and peak memory growth."""
    import gc

    from zoo.fewshot.episodic import query_targets
    from zoo.fewshot.maml import MAML

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    episodes = torch.load(spec["episodes"])
    support_all, query_all = episodes["support"].to(device), episodes["query"].to(device)
    state = conv4_state()
    torch.manual_seed(SEED)
    model = MAML(backbone=conv4(state), feature_dim=FEATURE_DIM, n_way=support_all.shape[1], inner_lr=MAML_INNER_LR,
                 inner_steps=spec["inner_steps"], first_order=spec["first_order"], tasks_per_step=1).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    targets = query_targets(query_all.shape[1], query_all.shape[2], device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline, rss_source = reset_peak_rss()
    start = None
    for i in range(spec["warmup"] + spec["steps"]):
        if i == spec["warmup"]:
            synchronize(device)
            start = time.perf_counter()
        e = i % len(support_all)
        logits = model.adapted_query_logits(support_all[e], query_all[e], spec["inner_steps"], spec["first_order"])
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
    synchronize(device)
    ms = (time.perf_counter() - start) / spec["steps"] * 1000
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    else:
        peak_mb = (peak_rss(rss_source) - baseline) / 1024
    return {"ms": ms, "peak_mb": peak_mb, "rss_source": "cuda" if device.type == "cuda" else rss_source}


def bench_maml(opts, device: torch.device, dataset: EpisodeData, source: str) -> None:
    loader = zoo_loader(dataset, opts, 8, SEED)  # 8 distinct episodes, cycled
    episodes = list(loader)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "episodes.pt")
        torch.save({"support": torch.stack([e.support for e in episodes]),
                    "query": torch.stack([e.query for e in episodes])}, path)
        for steps in opts.inner_steps:
            for first_order in (True, False):
                spec = {"inner_steps": steps, "first_order": first_order, "episodes": path, "warmup": opts.maml_warmup,
                        "steps": opts.maml_steps, "threads": torch.get_num_threads(), "device": device.type}
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_maml-child", json.dumps(spec)],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"MAML child {spec} failed:\n{out.stderr[-4000:]}")
                results[steps, first_order] = json.loads(out.stdout.strip().splitlines()[-1])
    counter = next(iter(results.values()))["rss_source"]
    memory = ("peak MB (cuda max_memory_allocated over pre-step)" if device.type == "cuda"
              else f"peak MB ({'VmHWM over reset' if counter == 'VmHWM' else 'ru_maxrss growth over'} pre-step RSS)")
    print(f"\n== MAML meta-update: Conv-4, {opts.n_way}-way {opts.k_shot}-shot {opts.n_query}-query, 28x28x1, "
          f"tasks_per_step=1, inner lr {MAML_INNER_LR}, Adam(1e-3), {opts.maml_steps} timed steps after "
          f"{opts.maml_warmup} warm-up, one fresh process per config, {device.type}, {torch.get_num_threads()} threads")
    print(f"data: {source}")
    print(f"{'config':28s}{'ms/step':>10s}{memory:>52s}")
    for steps in opts.inner_steps:
        for first_order in (True, False):
            r = results[steps, first_order]
            name = f"inner_steps={steps} {'first-order' if first_order else 'second-order'}"
            print(f"{name:28s}{r['ms']:10.1f}{r['peak_mb']:52.1f}")
        fo, so = results[steps, True], results[steps, False]
        mem = f"{so['peak_mb'] / fo['peak_mb']:.2f}" if fo["peak_mb"] > 0 else "n/a (FO growth 0)"
        print(f"{'':4s}ratio SO/FO at inner_steps={steps}: time {so['ms'] / fo['ms']:.2f}, memory {mem}")


# ------------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=120,
                        help="timed ProtoNet episodes per side, split evenly over the --repeats runs")
    parser.add_argument("--warmup", type=int, default=10, help="ProtoNet warm-up episodes at the start of every run")
    parser.add_argument("--repeats", type=int, default=2, help="ProtoNet runs per side")
    parser.add_argument("--schedule", choices=("interleaved", "alternating"), default="interleaved",
                        help="interleaved: one easyfsl episode after every zoo step inside one fit; alternating: "
                             "whole runs, easyfsl then zoo")
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--k-shot", type=int, default=5)
    parser.add_argument("--n-query", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5], help="MAML inner steps to compare")
    parser.add_argument("--maml-steps", type=int, default=10, help="timed MAML meta-updates per configuration")
    parser.add_argument("--maml-warmup", type=int, default=2, help="MAML warm-up meta-updates per configuration")
    parser.add_argument("--glyph-root", default=os.path.join(tempfile.gettempdir(), "zoo-bench-glyphs"),
                        help="where the procedural glyph set is written (once; cached by its marker file)")
    parser.add_argument("--skip-protonet", action="store_true")
    parser.add_argument("--skip-maml", action="store_true")
    parser.add_argument("--_maml-child", dest="maml_child", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()

    if opts.maml_child is not None:
        print(json.dumps(maml_child(json.loads(opts.maml_child))))
        return

    opts.per_run = max(1, -(-opts.episodes // opts.repeats))
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    device = torch.device(opts.device)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    for message in ("does not have many workers", "GPU available but not used", "Attribute 'backbone' is an instance",
                    "You defined a `validation_step` but have no `val_dataloader`", "`isinstance(treespec, LeafSpec)`"):
        warnings.filterwarnings("ignore", message=f".*{re.escape(message)}.*")

    began, load_before = time.perf_counter(), os.getloadavg()[0]
    threads = torch.get_num_threads()
    if load_before + threads > (os.cpu_count() or 1) + 0.5:
        print(f"note: the machine is busy (1-min load average {load_before:.2f} on {os.cpu_count()} CPUs) and torch "
              f"uses {threads} thread(s): timings will be inflated" + ("; consider --threads 1" if threads > 1 else ""))
    dataset, source = load_glyphs(opts.glyph_root)
    if not opts.skip_protonet:
        bench_protonet(opts, device, dataset, source)
    if not opts.skip_maml:
        bench_maml(opts, device, dataset, source)
    print(f"\ntotal wall time {time.perf_counter() - began:.0f} s; 1-min load average {load_before:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end, on {os.cpu_count()} CPUs (other processes skew timings)")


if __name__ == "__main__":
    main()
