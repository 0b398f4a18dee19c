"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017, arXiv:1703.03400).

Meta-learns an initialisation ``θ`` from which a few gradient steps on a task's support set give a good classifier:
inner loop ``θ'_t = θ'_{t−1} − α ∇ L_support(θ'_{t−1})`` (Eq. 1), outer loop
``θ ← θ − β ∇_θ Σ_tasks L_query(θ'_T)`` (Eq. 2, Algorithm 2; Adam in practice). Second order back-propagates
through the inner updates (``create_graph=True``); first order (Sec. 5.2) treats the inner gradients as constants, so
the meta-gradient is the query gradient at the adapted parameters.

The inner loop is functional (``torch.func.functional_call`` with a dict of adapted tensors), so the module's own
parameters are never modified by adaptation. BatchNorm follows the reference code (cbfinn/maml and CloserLook's
``BatchNorm2d_fw``): always batch statistics, no running averages, in training and evaluation, so the query batch
is normalised with its own statistics ("transductive"); the constructor switches every BN of the backbone to that mode.
Tasks are accumulated over ``tasks_per_step`` training batches (CloserLook's ``n_task = 4``; the meta-loss is their
sum) before each Adam step. Evaluation adapts with gradients enabled inside Lightning's no-grad loops.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from zoo.fewshot.episodic import EpisodicModule, episode_accuracy, query_targets
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["use_batch_statistics", "adapt", "MAML"]


def use_batch_statistics(module: nn.Module) -> None:
    """Make every BatchNorm in ``module`` normalise with the current batch only (MAML's transductive BN)."""
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.track_running_stats = False
            m.running_mean, m.running_var, m.num_batches_tracked = None, None, None


def adapt(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    inner_lr: float,
    first_order: bool,
) -> dict[str, torch.Tensor]:
    """``steps`` SGD steps on ``CE(model(images), labels)`` from ``params``; returns the adapted tensors (Eq. 1).

    With ``first_order=False`` the returned tensors stay differentiable w.r.t. ``params`` through the inner
    gradients; with ``first_order=True`` the inner gradients are constants.
    """
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, params, (images,)), labels)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
        params = {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads)}
    return params


class MAML(EpisodicModule):
    """MAML with a linear classifier on the backbone features (CloserLook's ``MAML`` model).

    Args:
        backbone, feature_dim: see ``EpisodicModule``; BN layers are switched to batch statistics.
        n_way: classes per episode (the classifier's outputs); evaluation episodes must have the same ``n_way``.
        inner_lr: ``α`` (CloserLook/Finn et al. miniImageNet: 0.01; Omniglot: 0.4 in the paper, 0.1 CloserLook).
        inner_steps: ``T`` during training (miniImageNet: 5; Omniglot: 1).
        eval_inner_steps: ``T`` at validation/test (Finn et al.: 10 on miniImageNet; CloserLook keeps 5).
        first_order: first-order approximation (no second derivatives).
        tasks_per_step: tasks (training batches) summed per meta-update (CloserLook 4; Finn et al. Omniglot 32).
        lr: meta learning rate ``β`` (Adam, 1e-3).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        feature_dim: int,
        n_way: int = 5,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        eval_inner_steps: Optional[int] = None,
        first_order: bool = False,
        tasks_per_step: int = 4,
        lr: float = 1e-3,
    ) -> None:
        super().__init__(backbone=backbone, feature_dim=feature_dim, lr=lr)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        self.automatic_optimization = False
        use_batch_statistics(self.backbone)
        self.classifier = nn.Linear(feature_dim, n_way)
        nn.init.zeros_(self.classifier.bias)
        self.n_way, self.inner_lr, self.inner_steps = n_way, inner_lr, inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.first_order, self.tasks_per_step = first_order, tasks_per_step

    def adapted_query_logits(self, support: torch.Tensor, query: torch.Tensor, steps: int,
                             first_order: bool) -> torch.Tensor:
        """Adapt on the support set and return the query logits ``(N·Q, N)`` under the adapted parameters."""
        n_way, k_shot = support.shape[:2]
        if n_way != self.n_way:
            raise ValueError(f"MAML's classifier has {self.n_way} outputs but the episode is {n_way}-way; train and "
                             f"evaluate with the same n_way (model.init_args.n_way)")
        params = dict(self.named_parameters())
        labels = query_targets(n_way, k_shot, support.device)
        adapted = adapt(self, params, support.flatten(0, 1), labels, steps, self.inner_lr, first_order)
        return functional_call(self, adapted, (query.flatten(0, 1),))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, n_way)`` under the module's parameters (``functional_call`` swaps in adapted ones)."""
        return self.classifier(self.embed(images))

    def episode_logits(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        # adaptation needs autograd even inside Lightning's evaluation loops (inference mode / no_grad); tensors
        # created in inference mode must be cloned outside it before autograd may record them
        with torch.inference_mode(False), torch.enable_grad():
            support, query = support.clone(), query.clone()
            steps = self.inner_steps if self.training else self.eval_inner_steps
            logits = self.adapted_query_logits(support, query, steps, first_order=True)
        return logits.detach()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        support, query, _ = batch
        logits = self.adapted_query_logits(support, query, self.inner_steps, self.first_order)
        targets = query_targets(query.shape[0], query.shape[1], logits.device)
        loss = F.cross_entropy(logits, targets)
        self.manual_backward(loss)  # gradients of the summed task losses accumulate on θ (Algorithm 2, line 10)
        last = (batch_idx + 1) % self.tasks_per_step == 0 or self.trainer.is_last_batch
        if last:
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", episode_accuracy(logits, targets), prog_bar=True)
        return loss
