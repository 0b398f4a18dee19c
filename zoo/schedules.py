"""Learning-rate and loss-weight schedules of the papers, as factors of a step.

Every function returns a multiplier for step ``t`` (0-based, counted in optimiser steps or iterations as the caller
says), so the same function serves ``torch.optim.lr_scheduler.LambdaLR`` (``LambdaLR(opt, lambda t: f(t, ...))``) and
the ramp of an unlabeled loss weight. They are pure: no state, no trainer, so a test can check them by hand.

* ``warmup_cosine``: linear warm-up, then ``cos(π · cycles · k / K)`` (UDA, FixMatch, Meta Pseudo Labels).
* ``warmup_multistep``: linear warm-up from a factor, then ×γ at each milestone (the detectors' 1× schedule).
* ``half_then_linear_decay``: constant for the first half, then linearly to 0 (U-GAT-IT, NICE-GAN).
* ``linear_rampup``: ``min(1, t / T)`` (the ramp of an unlabeled loss's weight).
* ``poly``: ``(1 − t / T)^power`` (DeepLab's "poly" policy; SEAM / PPC's ``PolyOptimizer``).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

__all__ = ["warmup_cosine", "warmup_multistep", "half_then_linear_decay", "linear_rampup", "poly"]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0, cycles: float = 7 / 16) -> float:
    """Linear warm-up over ``warmup_steps``, then ``cos(π · cycles · k / K)`` over the remaining ``K`` steps.

    ``cycles = 7/16`` is UDA's and FixMatch's schedule (it ends at ≈0.2× the peak); ``0.5`` is the half cosine to
    zero of Meta Pseudo Labels' PyTorch code.

    >>> warmup_cosine(0, 100, warmup_steps=10), warmup_cosine(10, 100, warmup_steps=10), warmup_cosine(100, 100, 0, 1)
    (0.1, 1.0, 0.0)
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    k, span = step - warmup_steps, max(1, total_steps - warmup_steps)
    return max(0.0, math.cos(math.pi * cycles * min(k, span) / span))


def warmup_multistep(step: int, milestones: Sequence[int], gamma: float = 0.1, warmup_steps: int = 0,
                     warmup_factor: float = 1 / 3) -> float:
    """``warmup(t) · γ^(number of milestones ≤ t)``: the step schedule of maskrcnn-benchmark / mmdetection.

    The warm-up rises linearly from ``warmup_factor`` at step 0 to 1 at ``warmup_steps``.

    >>> [round(warmup_multistep(t, milestones=[8, 11], warmup_steps=4), 4) for t in (0, 2, 4, 8, 11)]
    [0.3333, 0.6667, 1.0, 0.1, 0.01]
    """
    warmup = 1.0
    if step < warmup_steps:
        warmup = warmup_factor + (1 - warmup_factor) * step / warmup_steps
    return warmup * gamma ** sum(step >= m for m in milestones)


def half_then_linear_decay(total_steps: int) -> Callable[[int], float]:
    """A ``LambdaLR`` factor: 1 for the first half of ``total_steps``, then linear to 0 at the end (both unpaired
    translation papers decay the learning rate this way).

    >>> factor = half_then_linear_decay(100)
    >>> factor(0), factor(50), factor(75), factor(100)
    (1.0, 1.0, 0.5, 0.0)
    """
    half = max(total_steps // 2, 1)

    def factor(step: int) -> float:
        return 1.0 if step <= half else max(0.0, 1.0 - (step - half) / max(total_steps - half, 1))

    return factor


def linear_rampup(step: float, ramp_steps: float) -> float:
    """``min(1, step / ramp_steps)``, and 1 when ``ramp_steps ≤ 0``: the weight of an unlabeled loss early in
    training.

    >>> linear_rampup(5, 10), linear_rampup(20, 10), linear_rampup(3, 0)
    (0.5, 1.0, 1.0)
    """
    return 1.0 if ramp_steps <= 0 else min(1.0, step / ramp_steps)


def poly(step: int, total_steps: int, power: float = 0.9) -> float:
    """``(1 − step / total_steps)^power``, 0 from ``total_steps`` on (DeepLab's poly policy, SEAM / PPC's
    ``PolyOptimizer``).

    >>> poly(0, 100), round(poly(50, 100), 4), poly(100, 100)
    (1.0, 0.5359, 0.0)
    """
    return (1 - min(step, total_steps) / max(total_steps, 1)) ** power
