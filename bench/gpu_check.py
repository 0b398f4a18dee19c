"""GPU readiness: every embedded-default config trained for a few hundred steps in fp32, 16-mixed and bf16-mixed.

    python bench/gpu_check.py [--steps 200] [--budget 450] [--out gpu_check.md]   # on a CUDA device, < 8 minutes
    python bench/gpu_check.py --smoke                                            # CPU: 2 configs, a few steps

A GPU is lent for minutes at a time, so this is one prepared command. Each config is built by ``ZooCLI`` exactly as
``zoo fit -c <config>`` builds it (the config's model, data, optimizer and schedule; the zoo's callbacks, among them
the non-finite-loss guard), with validation, loggers and the config's image callbacks off, and trained for
``--steps`` optimizer steps in one process. Per config and precision it prints:

* ``finite``: every training loss of the run was finite (the guard stops a run at the first NaN/Inf; the error is
  shown instead);
* ``s/batch``: median seconds per training batch after ``--warmup`` batches, the device synchronised around each;
* ``bf16 speed-up``: fp32 time over bf16-mixed time (on the bf16 row);
* ``peak MiB``: ``torch.cuda.max_memory_allocated`` during the run;
* ``scale``: the GradScaler's scale at the end of a ``16-mixed`` run: Lightning's mixed-precision plugin scales every
  loss, the two-optimizer modules' (GANs, Meta Pseudo Labels) manual backward passes included; a scale that fell to
  a tiny value means the steps kept overflowing.

The table is also written as markdown (``--out``), with the date, device and versions, for ``docs/benchmarks.md``.
Configs run in order until ``--budget`` seconds have passed; the rest are listed as skipped. ``--smoke`` runs
``classification/digits`` (automatic optimisation) and ``semisup/mpl_digits`` (manual, two optimizers) in fp32 and
bf16-mixed for a few steps on whatever device there is, so that the script itself is tested without a GPU
(``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo.callbacks import NonFiniteLossError  # noqa: E402
from zoo.cli import ZooCLI  # noqa: E402

EMBEDDED_SUFFIXES = ("_digits", "_glyphs", "_toybirds", "_synthetic")
# Needs an MPL checkpoint that only an earlier run writes.
NEEDS_A_CHECKPOINT = {"semisup/mpl_finetune_digits"}
SMOKE_CONFIGS = ["classification/digits", "semisup/mpl_digits"]


def embedded_configs() -> list[str]:
    """Every config that trains on an embedded default (no download), as ``family/name``."""
    names = []
    for path in sorted((ROOT / "configs").glob("*/*.yaml")):
        name = f"{path.parent.name}/{path.stem}"
        if (path.stem.endswith(EMBEDDED_SUFFIXES) or name == "classification/digits") and name not in NEEDS_A_CHECKPOINT:
            names.append(name)
    return names


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Probe(Callback):
    """Times every training batch (device synchronised) and records the logged training losses."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        _sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        _sync()
        self.times.append(time.perf_counter() - self._start)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.losses.append(float(loss.detach().float()))
        else:  # manual optimisation returns nothing: read what the step logged
            self.losses += [float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and "loss" in k]


@dataclass
class Row:
    config: str
    precision: str
    finite: str
    seconds_per_batch: Optional[float]
    peak_mib: Optional[float]
    scale: Optional[float]
    speed_up: Optional[float] = None


def run(config: str, precision: str, steps: int, warmup: int, root: str, extra: Sequence[str] = ()) -> Row:
    """Train ``config`` for ``steps`` optimizer steps in ``precision``; ``extra``: more command-line overrides."""
    args = [
        "-c", str(ROOT / "configs" / f"{config}.yaml"), f"--trainer.default_root_dir={root}",
        "--trainer.callbacks=[]", "--trainer.logger=false", f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", f"--trainer.precision={precision}",
        "--trainer.devices=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--checkpoint.monitor=null", f"--last_checkpoint.every_n_train_steps={steps + 1}", *extra,
    ]
    cli = ZooCLI(args=args, run=False)
    probe = Probe()
    cli.trainer.callbacks.append(probe)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    finite = "yes"
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    except NonFiniteLossError as err:
        finite = f"no: {str(err).split(';')[0]}"
    if finite == "yes" and not all(math.isfinite(x) for x in probe.losses):
        finite = "no: a logged loss is NaN/Inf"
    timed = probe.times[warmup:] or probe.times
    scaler = getattr(cli.trainer.precision_plugin, "scaler", None)
    return Row(config, precision, finite, statistics.median(timed) if timed else None,
               torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
               float(scaler.get_scale()) if scaler is not None else None)


def _fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(rows: list[Row], skipped: list[str], device: str, steps: int) -> str:
    head = (f"GPU check, {datetime.date.today().isoformat()}, {device}, torch {torch.__version__}, lightning "
            f"{lightning.__version__}: {steps} optimizer steps per run, median s/batch after warm-up.\n\n")
    lines = ["| config | precision | finite | s/batch | bf16 speed-up | peak MiB | scale |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.config} | {r.precision} | {r.finite} | {_fmt(r.seconds_per_batch, '.4f')} | "
                     f"{_fmt(r.speed_up, '.2f')} | {_fmt(r.peak_mib, '.0f')} | {_fmt(r.scale, '.3g')} |")
    tail = f"\n\nSkipped (time budget): {', '.join(skipped)}\n" if skipped else "\n"
    return head + "\n".join(lines) + tail


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (200; --smoke: 6)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches per run (20; --smoke: 2)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds after which no new config starts")
    parser.add_argument("--configs", nargs="*", default=None, help="family/name of the configs (default: all embedded)")
    parser.add_argument("--smoke", action="store_true", help="2 configs, fp32 and bf16-mixed, a few steps (CPU test)")
    parser.add_argument("--out", default="gpu_check.md", help="where the markdown table goes")
    opts = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    if not opts.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke for the CPU version")
    steps = opts.steps or (6 if opts.smoke else 200)
    warmup = opts.warmup if opts.warmup is not None else (2 if opts.smoke else 20)
    configs = opts.configs or (SMOKE_CONFIGS if opts.smoke else embedded_configs())
    # fp16 autocast needs CUDA (Lightning turns 16-mixed into bf16-mixed on CPU).
    precisions = ["32-true", "bf16-mixed"] if opts.smoke or not torch.cuda.is_available() else \
        ["32-true", "16-mixed", "bf16-mixed"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"

    rows: list[Row] = []
    skipped: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            if time.perf_counter() - start > opts.budget:
                skipped.append(config)
                continue
            by_precision = {}
            for precision in precisions:
                row = run(config, precision, steps, warmup, os.path.join(tmp, config.replace("/", "_"), precision))
                by_precision[precision] = row
                rows.append(row)
                print(f"{config:32s} {precision:10s} finite={row.finite:5s} s/batch={_fmt(row.seconds_per_batch, '.4f')} "
                      f"peak MiB={_fmt(row.peak_mib, '.0f')} scale={_fmt(row.scale, '.3g')}", flush=True)
            fp32, bf16 = by_precision.get("32-true"), by_precision.get("bf16-mixed")
            if fp32 and bf16 and fp32.seconds_per_batch and bf16.seconds_per_batch:
                bf16.speed_up = fp32.seconds_per_batch / bf16.seconds_per_batch
    table = markdown(rows, skipped, device, steps)
    Path(opts.out).write_text(table)
    print("\n" + table + f"\nwritten to {opts.out} in {time.perf_counter() - start:.0f} s")
    return table


if __name__ == "__main__":
    main()
