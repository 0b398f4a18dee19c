"""Losses shared by the semi-supervised papers: UDA's annealed supervised loss and masked consistency, and entropy.

* Training Signal Annealing and the sharpened, confidence-masked consistency follow Xie et al., "Unsupervised Data
  Augmentation for Consistency Training" (NeurIPS 2020), §3.2 and Appendix B / the official ``image/main.py``.
* Entropy is Grandvalet & Bengio, "Semi-supervised Learning by Entropy Minimization" (NIPS 2004).
* Meta Pseudo Labels (Pham et al., CVPR 2021) trains its teacher with the same UDA objective.

Everything is computed in fp32 (``logits.float()``): under fp16 autocast, ``log_softmax`` of large logits and the
KL between near-one-hot distributions lose the precision the masks and thresholds compare against.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["TSASchedule", "tsa_threshold", "tsa_cross_entropy", "sharpened_consistency", "entropy"]

TSASchedule = Literal["none", "linear", "log", "exp"]


def tsa_threshold(progress: float, num_classes: int, schedule: TSASchedule) -> float:
    """UDA's TSA threshold ``η_t = α_t (1 − 1/K) + 1/K`` at ``progress = t / T`` (§3.2).

    ``α_t`` is ``r`` (linear), ``1 − exp(−5r)`` (log: releases the signal early, for large labeled sets) or
    ``exp(5(r − 1))`` (exp: releases it late, for tiny labeled sets that overfit). ``none`` keeps every example.
    """
    if schedule == "none":
        return 1.0
    r = min(max(float(progress), 0.0), 1.0)
    if schedule == "linear":
        alpha = r
    elif schedule == "log":
        alpha = 1.0 - math.exp(-5.0 * r)
    elif schedule == "exp":
        alpha = math.exp(5.0 * (r - 1.0))
    else:
        raise ValueError(f"tsa schedule must be one of none, linear, log, exp; got {schedule!r}")
    return alpha * (1.0 - 1.0 / num_classes) + 1.0 / num_classes


def tsa_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, threshold: float, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the labeled examples the model is not yet sure of: ``(loss, kept (B,) bool)``.

    An example leaves the loss once its **true-class** probability exceeds ``threshold`` (UDA's
    ``anneal_sup_loss``; USB thresholds the max probability instead, which keeps confidently *wrong* examples out).
    The mean is over the kept examples (``max(kept, 1)``), so the loss is 0, not NaN, when all are dropped.
    """
    logits = logits.float()
    per_example = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    if threshold >= 1.0:
        return per_example.mean(), torch.ones_like(labels, dtype=torch.bool)
    with torch.no_grad():
        true_prob = logits.softmax(-1).gather(1, labels[:, None]).squeeze(1)
        kept = true_prob <= threshold
    return (per_example * kept).sum() / kept.sum().clamp(min=1), kept


def sharpened_consistency(
    logits_weak: torch.Tensor,
    logits_strong: torch.Tensor,
    temperature: float = 0.4,
    threshold: float = 0.8,
    mask_on_sharpened: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """UDA's consistency loss ``mean_i m_i · KL(p̃_i ‖ q_i)``: ``(loss, mask (N,) bool)``.

    ``p̃ = softmax(z_weak / τ)`` is the sharpened target on the weak (original) view, with stop-gradient; ``q`` is the
    prediction on the strong view. ``m_i = 1[max p_i > threshold]`` keeps confident targets: UDA measures ``p`` before
    sharpening (``mask_on_sharpened=False``), Meta Pseudo Labels' code after. The mean runs over the whole unlabeled
    batch, masked examples counting as zeros (UDA-TF), so the loss's scale grows with the share of confident targets.
    """
    logits_weak, logits_strong = logits_weak.detach().float(), logits_strong.float()
    target = (logits_weak / temperature).softmax(-1)
    confidence = (target if mask_on_sharpened else logits_weak.softmax(-1)).max(-1).values
    mask = confidence > threshold
    log_q = logits_strong.log_softmax(-1)
    kl = (target * (target.clamp_min(1e-12).log() - log_q)).sum(-1)
    return (kl * mask).mean(), mask


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy ``H(softmax(z)) = −Σ_k p_k log p_k`` of each row (nats), differentiable through ``p``."""
    log_p = logits.float().log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)
