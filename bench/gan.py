"""Cost of one training iteration of U-GAT-IT light and NICE-GAN light, measured in one run, at 64×64 and 256×256.

An iteration is what each module's ``training_step`` does for one batch, without a Lightning ``Trainer``:

* **U-GAT-IT** (``zoo.gan.ugatit.UGATIT``): the D step (both translations under ``no_grad``, then
  ``discriminator_loss`` through the global and local discriminators of both domains, backward, Adam step), then the
  G step with every discriminator parameter's ``requires_grad`` off (what ``toggle_optimizer`` does):
  ``generator_losses`` (six generator passes: translation, cycle, identity, both directions; the four
  discriminators on the fakes), backward, Adam step, ``requires_grad`` restored, ``clip_rho_``, LR schedules stepped.
* **NICE-GAN** (``zoo.gan.nice_gan.NICEGAN``): the D step (``discriminator_loss``: the real images through both
  discriminators, fakes decoded from their codes under ``no_grad``, the fakes through both discriminators, backward,
  Adam step), then the G step the same way (``generator_losses``: the real images' codes under ``no_grad``, six
  decoder passes: translation, cycle, reconstruction, both directions; both discriminators on the fakes, whose codes
  feed the cycle). NICE-GAN has no generator encoder, it reuses the discriminators' first layers, so its iteration
  should be cheaper; the ratio NICE-GAN / U-GAT-IT is printed whichever way it comes out.

Architectures are each paper's defaults, light mode: U-GAT-IT ``ngf = ndf = 64``, 4 residual blocks, a 7-layer
global and a 5-layer local discriminator; NICE-GAN ``ch = 64``, 6 residual blocks, ``n_layers = 7`` with 2 extra
global stride-2 convolutions. Both papers train at 256 px and both *global* discriminators need at least 96 px
(after their stride-2 convolutions the map must still be ≥ 3 px for the stride-1 conv and the output conv with
reflection padding 1); at 64 px they fail with a padding error. So at any size where the paper's global
discriminator does not fit, this benchmark removes stride-2 layers from it one at a time until it does (64 px:
U-GAT-IT ``global_layers = 6``, NICE-GAN ``global_extra = 1``: one stride-2 conv fewer each, 2×2 global patch logits
in both), and says so in the ``global D`` column. Everything else, widths included, stays the papers'
(``--width`` changes ``ngf = ndf = ch`` for both models). Batch size 1 (the papers') unless ``--batch``.

Each (model, size) is built fresh (seed 0, random images in [−1, 1]) with ``total_iterations`` given to the
constructor, so ``configure_optimizers()`` needs no trainer; ``--warmup`` iterations run first, then ``--steps``
timed ones: the median ms per iteration is reported. Peak memory is the extra memory the timed iterations need on
top of what the model, its Adam states and the warm-up already left allocated (activations, gradients, workspace):
on CPU the growth of the resident set (``/proc/self/clear_refs`` resets the high-water mark ``VmHWM`` after
``malloc_trim`` has returned free heap pages, so it counts every allocation; Linux only); on CUDA
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before, with the
device synchronised around each timed iteration. Parameter counts are the generators' and the discriminators'
(NICE-GAN's encoders are part of its discriminators).

The defaults (both sizes, ``--steps 3`` after 1 warm-up) take about 4 minutes on 2 otherwise idle CPU cores (about
25 s per 256 px iteration, 2.5 s per 64 px one; 90 % of it at 256 px). On cores shared with other busy processes
use ``--threads 1``: with as many threads as cores, every parallel op waits for a descheduled thread and iteration
times swing by 10× and more (seen here: 2.2 s → 44–69 s for the same 64 px NICE-GAN iteration).

    python bench/gan.py [--sizes 64 256] [--steps 3] [--warmup 1] [--batch 1] [--width 64]
                        [--device cuda|cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.gan.layers import clip_rho_  # noqa: E402
from zoo.gan.nice_gan import NICEGAN  # noqa: E402
from zoo.gan.ugatit import UGATIT  # noqa: E402
from measure import measure  # noqa: E402  (bench/measure.py)



# ---- one iteration, as each training_step does it ---------------------------------------------------------------

@contextmanager
def generator_step_only(opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer) -> Iterator[None]:
    """Lightning's ``toggle_optimizer(opt_g)`` … ``untoggle_optimizer(opt_g)``: every parameter of either optimiser
    stops requiring gradients, ``opt_g``'s get their previous state back; on exit all are restored."""
    state: dict[nn.Parameter, bool] = {}
    for opt in (opt_g, opt_d):
        for group in opt.param_groups:
            for p in group["params"]:
                if p not in state:
                    state[p] = p.requires_grad
                    p.requires_grad_(False)
    for group in opt_g.param_groups:
        for p in group["params"]:
            p.requires_grad_(state[p])
    try:
        yield
    finally:
        for p, requires_grad in state.items():
            p.requires_grad_(requires_grad)


def ugatit_iteration(model: UGATIT, real_a: torch.Tensor, real_b: torch.Tensor, opt_g: torch.optim.Optimizer,
                     opt_d: torch.optim.Optimizer, schedules: tuple = ()) -> tuple[float, float]:
    """``UGATIT.training_step`` without the logging: (d_loss, g_loss)."""
    with torch.no_grad():
        fake_b, fake_a = model.gen_a2b(real_a)[0], model.gen_b2a(real_b)[0]
    d_loss = model.discriminator_loss(real_a, real_b, fake_a, fake_b)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()

    with generator_step_only(opt_g, opt_d):
        g_loss = model.generator_losses(real_a, real_b)["g_loss"]
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
    clip_rho_([model.gen_a2b, model.gen_b2a])
    for schedule in schedules:
        schedule.step()
    return d_loss.item(), g_loss.item()


def nicegan_iteration(model: NICEGAN, real_a: torch.Tensor, real_b: torch.Tensor, opt_g: torch.optim.Optimizer,
                      opt_d: torch.optim.Optimizer, schedules: tuple = ()) -> tuple[float, float]:
    """``NICEGAN.training_step`` without the logging: (d_loss, g_loss)."""
    d_loss = model.discriminator_loss(real_a, real_b)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()

    with generator_step_only(opt_g, opt_d):
        g_loss = model.generator_losses(real_a, real_b)["g_loss"]
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
    for schedule in schedules:
        schedule.step()
    return d_loss.item(), g_loss.item()


# ---- architectures ----------------------------------------------------------------------------------------------

def _fits(size: int, stride2_convs: int) -> bool:
    """A PatchGAN branch with ``stride2_convs`` (reflection pad 1, conv4, stride 2: ``s → s // 2``), then the stride-1
    conv (``s → s − 1``) and the output conv (reflection pad 1 needs ``s − 1 ≥ 2``) runs on ``size`` px."""
    return size // 2 ** stride2_convs >= 3


def ugatit_config(size: int, width: int) -> dict:
    global_layers = 7  # the paper's global discriminator: n_layers − 2 = 5 stride-2 convs
    while not _fits(size, global_layers - 2) and global_layers > 5:  # 5: the local discriminator's depth
        global_layers -= 1
    if not _fits(size, global_layers - 2):
        raise ValueError(f"{size} px is too small for U-GAT-IT's discriminators (≥ 24 px)")
    return dict(ngf=width, ndf=width, n_res=4, global_layers=global_layers, local_layers=5, img_size=size, light=True)


def nicegan_config(size: int, width: int) -> dict:
    global_extra = 2  # the paper's global head: 2 encoder + (n_layers − 6) + global_extra = 5 stride-2 convs
    while not _fits(size, 2 + 1 + global_extra) and global_extra > 1:
        global_extra -= 1
    if not _fits(size, 2 + 1 + global_extra):
        raise ValueError(f"{size} px is too small for NICE-GAN's global discriminator head (≥ 48 px with n_layers 7)")
    return dict(ch=width, n_res=6, n_layers=7, global_extra=global_extra, img_size=size, light=True)


MODELS = {
    "U-GAT-IT": (UGATIT, ugatit_config, ugatit_iteration,
                 lambda c: f"{c['global_layers']} layers" + (" (paper 7)" if c["global_layers"] != 7 else "")),
    "NICE-GAN": (NICEGAN, nicegan_config, nicegan_iteration,
                 lambda c: f"extra {c['global_extra']}" + (" (paper 2)" if c["global_extra"] != 2 else "")),
}


def _millions(params: Iterator[nn.Parameter]) -> float:
    return sum(p.numel() for p in params) / 1e6


def bench(name: str, size: int, args: argparse.Namespace, device: torch.device) -> dict:
    cls, config, iteration, describe = MODELS[name]
    cfg = config(size, args.width)
    torch.manual_seed(0)
    model = cls(**cfg, total_iterations=1000).to(device).train()
    (opt_g, opt_d), schedules = model.configure_optimizers()
    schedules = tuple(s["scheduler"] for s in schedules)
    g = torch.Generator().manual_seed(1)
    real_a = (torch.rand(args.batch, 3, size, size, generator=g) * 2 - 1).to(device)
    real_b = (torch.rand(args.batch, 3, size, size, generator=g) * 2 - 1).to(device)

    def step() -> tuple[float, float]:
        return iteration(model, real_a, real_b, opt_g, opt_d, schedules)

    for _ in range(args.warmup):
        step()
    ms, mib, (d_loss, g_loss) = measure(step, args.steps, device)
    assert np.isfinite(d_loss) and np.isfinite(g_loss), (name, size, d_loss, g_loss)
    row = dict(model=name, size=size, global_d=describe(cfg), g_params=_millions(model.generator_parameters()),
               d_params=_millions(model.discriminator_parameters()), ms=ms, mib=mib)
    del model, opt_g, opt_d, schedules, real_a, real_b
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--width", type=int, default=64, help="ngf = ndf (U-GAT-IT) and ch (NICE-GAN); papers: 64")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({where}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"one iteration = D step + G step, light models, batch {args.batch}, width {args.width}; "
          f"median of {args.steps} after {args.warmup} warm-up; peak = extra memory during the timed iterations")
    print(f"\n{'model':>9} {'size':>5} {'global D':>17} {'G params':>9} {'D params':>9} {'ms/iter':>9} "
          f"{'peak MiB':>9}")
    rows = {}
    for size in args.sizes:
        for name in MODELS:
            r = rows[name, size] = bench(name, size, args, device)
            print(f"{name:>9} {size:>5} {r['global_d']:>17} {r['g_params']:>8.2f}M {r['d_params']:>8.2f}M "
                  f"{r['ms']:>9.0f} {r['mib']:>9.0f}", flush=True)
    print("\nNICE-GAN / U-GAT-IT")
    for size in args.sizes:
        nice, ugatit = rows["NICE-GAN", size], rows["U-GAT-IT", size]
        print(f"{size:>4} px: time {nice['ms'] / ugatit['ms']:.2f}×, peak memory {nice['mib'] / ugatit['mib']:.2f}×, "
              f"parameters {(nice['g_params'] + nice['d_params']) / (ugatit['g_params'] + ugatit['d_params']):.2f}×")


if __name__ == "__main__":
    main()
