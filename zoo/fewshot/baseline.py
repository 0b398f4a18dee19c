"""Baseline and Baseline++ from "A Closer Look at Few-shot Classification" (Chen et al., ICLR 2019, arXiv:1904.04232).

Pre-train a backbone with an ordinary classifier over all base classes (plain batches, cross-entropy), then for each
novel episode freeze the backbone and fit a *new* classifier on the support features (Sec. 3.1): SGD with lr 0.01,
momentum 0.9, dampening 0.9, weight decay 1e-3, 100 epochs in mini-batches of 4 (``methods/baselinefinetune.py``).

- Baseline: a linear layer ``W x + b``.
- Baseline++ (Sec. 3.2): a cosine classifier, ``s_c = scale · cos(x, w_c)``, which reduces intra-class variation.
  CloserLook's ``distLinear`` wraps the weights in weight normalisation, so each class vector has a learned norm
  ``g_c`` and the scores are ``scale · g_c · cos`` (CloserLook issue #4); ``learnable_norm=False`` keeps ``|s_c| ≤ scale``.
  ``scale`` is 2 for ≤ 200 classes and 10 above (Omniglot's 4112 rotated classes).

The fine-tuning runs inside ``validation_step``/``test_step`` with gradients enabled; the backbone is never touched.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from zoo.contracts import check_num_classes
from zoo.fewshot.episodic import EpisodicModule, query_targets
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["CosineClassifier", "make_classifier", "finetune_classifier", "Baseline"]


class CosineClassifier(nn.Module):
    """Baseline++'s ``distLinear``: ``scale · (x/‖x‖) · w_c`` with ``w_c = g_c v_c/‖v_c‖`` (or ``g_c = 1``).

    Args:
        dim: feature size.
        num_classes: outputs.
        scale: score scale (default: 2 if ``num_classes ≤ 200`` else 10, as CloserLook).
        learnable_norm: learn a norm ``g_c`` per class (weight normalisation, CloserLook's default).
    """

    def __init__(self, dim: int, num_classes: int, scale: Optional[float] = None, learnable_norm: bool = True) -> None:
        super().__init__()
        self.scale = scale if scale is not None else (2.0 if num_classes <= 200 else 10.0)
        self.learnable_norm = learnable_norm
        self.linear = nn.Linear(dim, num_classes, bias=False)
        if learnable_norm:
            weight_norm(self.linear, name="weight", dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / (x.norm(dim=1, keepdim=True) + 1e-5)
        weight = self.linear.weight if self.learnable_norm else F.normalize(self.linear.weight, dim=1)
        return self.scale * x @ weight.T


def make_classifier(kind: str, dim: int, num_classes: int, scale: Optional[float] = None) -> nn.Module:
    if kind == "linear":
        head = nn.Linear(dim, num_classes)
        nn.init.zeros_(head.bias)
        return head
    if kind == "cosine":
        return CosineClassifier(dim, num_classes, scale)
    raise ValueError(f"classifier must be 'linear' (Baseline) or 'cosine' (Baseline++), got {kind!r}")


def finetune_classifier(
    head: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 100,
    batch_size: int = 4,
    lr: float = 0.01,
    generator: Optional[torch.Generator] = None,
) -> nn.Module:
    """Fit ``head`` on fixed ``features`` with CloserLook's recipe (SGD, momentum/dampening 0.9, wd 1e-3)."""
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, dampening=0.9, weight_decay=1e-3)
    n = len(labels)
    order = torch.rand(epochs, n, generator=generator).argsort(dim=1).to(features.device)  # a permutation per epoch
    # Hundreds of steps on (4, D) tensors: on CPU, intra-op threads only add synchronisation (measured 2.4 ms/step
    # single-threaded vs 90 ms/step with 2 threads on a busy 2-core machine), so the loop runs single-threaded.
    threads = torch.get_num_threads()
    if features.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for epoch_order in order:
            for start in range(0, n, batch_size):  # SGD steps over mini-batches, not a loop over samples
                batch = epoch_order[start : start + batch_size]
                loss = F.cross_entropy(head(features[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return head


class Baseline(EpisodicModule):
    """Baseline (``classifier="linear"``) or Baseline++ (``classifier="cosine"``): pre-train, then fine-tune a head.

    Training reads plain ``(images, labels)`` batches over the base classes (``data.init_args.train_mode: batch``);
    validation and test read episodes.

    Args:
        backbone, feature_dim, lr: see ``EpisodicModule``.
        num_classes: base classes of the pre-training classifier (must match the datamodule).
        classifier: ``linear`` or ``cosine``.
        scale: cosine scale (default: CloserLook's rule).
        finetune_epochs, finetune_batch_size, finetune_lr: the per-episode fine-tuning recipe.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        classifier: str = "cosine",
        scale: Optional[float] = None,
        finetune_epochs: int = 100,
        finetune_batch_size: int = 4,
        finetune_lr: float = 0.01,
        lr: float = 1e-3,
    ) -> None:
        super().__init__(backbone=backbone, feature_dim=feature_dim, lr=lr)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        self.num_classes, self.classifier_kind, self.scale = num_classes, classifier, scale
        self.classifier = make_classifier(classifier, feature_dim, num_classes, scale)
        self.finetune_epochs, self.finetune_batch_size, self.finetune_lr = finetune_epochs, finetune_batch_size, finetune_lr

    def on_fit_start(self) -> None:
        check_num_classes(self, self.num_classes, what="base classes")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if len(batch) != 2:
            raise ValueError("Baseline pre-trains on plain batches: set `data.init_args.train_mode: batch`")
        images, labels = batch
        logits = self.classifier(self.embed(images))
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(1) == labels).float().mean() * 100, prog_bar=True)
        return loss

    def episode_logits(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Query logits ``(N·Q, N)`` of a new head fitted on the frozen support features."""
        n_way, k_shot = support.shape[:2]
        with torch.no_grad():
            support_features, query_features = self.embed_episode(support, query)
        # the same episode gets the same head initialisation and mini-batch order on any rank and in any run
        seed = hash(tuple(support_features.flatten()[:8].tolist())) & 0x7FFF_FFFF
        generator = torch.Generator().manual_seed(seed)
        with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            features = support_features.flatten(0, 1).clone()
            labels = query_targets(n_way, k_shot, features.device)
            head = make_classifier(self.classifier_kind, self.feature_dim, n_way, self.scale).to(features)
            finetune_classifier(head, features, labels, self.finetune_epochs, self.finetune_batch_size,
                                self.finetune_lr, generator)
            return head(query_features.clone()).detach()
