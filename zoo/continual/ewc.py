"""Elastic Weight Consolidation (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS
2017), as FACIL runs it (``src/approach/ewc.py``).

``L = CE + λ · Σ_i F_i (θ_i − θ_old,i)² / 2`` over the feature extractor's parameters (the heads are excluded), where
``F`` is the diagonal empirical Fisher with the true labels (``fi_sampling_type='true'``: cross-entropy over the
concatenated heads with the global label), merged across tasks as ``F ← α·F + (1 − α)·F_task`` (α = 0.5; the first
task's Fisher is therefore halved, as in FACIL).

The Fisher, two ways (``fisher_samples``):

* ``per_sample`` (default): ``F = mean_i g_i²`` with ``g_i`` the gradient of sample ``i``'s loss, all of a batch at
  once through ``torch.func.vmap(grad(...))``; batch norm uses its running statistics (a per-sample gradient has no
  batch statistics). This is the Fisher's definition, independent of the batch size, and exactly the same under DDP
  (each rank sums its shard's ``g_i²``; one all-reduce).
* ``batch``: FACIL's approximation, ``Σ_batches B · ḡ_B² / N`` with ``ḡ_B`` the mean gradient of a batch, in training
  mode (batch statistics) as FACIL computes it; the running statistics are restored afterwards (FACIL lets this pass
  update them). Under DDP each rank's batches are its shard's, so it differs from one process's value.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from zoo.continual.incremental import IncrementalLearner, MultiHeadNet

__all__ = ["ewc_penalty", "backbone_vector", "fisher_sums", "EWC"]


def ewc_penalty(theta: torch.Tensor, reference: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """``Σ_i F_i (θ_i − θ*_i)² / 2`` for flat vectors (EWC eq. 3 without λ)."""
    return (fisher * (theta - reference).pow(2)).sum() / 2


def backbone_vector(net: nn.Module, names: list[str]) -> torch.Tensor:
    """The backbone's weights ``names`` as one flat vector, read from parameters or, for a frozen copy
    (``zoo.ema.frozen_copy``), from the buffers that replaced them."""
    tensors = dict(net.backbone.named_parameters())
    tensors.update({k: v for k, v in net.backbone.named_buffers() if k in names and k not in tensors})
    return torch.cat([tensors[name].reshape(-1) for name in names])


def fisher_sums(net: MultiHeadNet, batches: Iterable[Any], num_heads: int, per_sample: bool = True,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
    """``(Σ over items of the squared gradient, number of items)`` for the backbone's parameters (flat, in
    ``named_parameters`` order), with the true-label cross-entropy over the first ``num_heads`` heads.

    ``per_sample``: ``Σ_i g_i²`` (vmapped per-sample gradients, evaluation mode). Otherwise FACIL's ``Σ_B B · ḡ_B²``
    in training mode, the running statistics put back afterwards. Divide the first by the second for the Fisher.
    """
    names = [name for name, _ in net.backbone.named_parameters()]
    total = torch.zeros(sum(p.numel() for p in net.backbone.parameters()), dtype=torch.float64, device=device)
    count, was_training = 0, net.training
    if per_sample:
        net.eval()
        weights = {f"backbone.{n}": p.detach() for n, p in net.backbone.named_parameters()}
        constants = {n: p.detach() for n, p in net.named_parameters() if not n.startswith("backbone.")}
        constants.update(dict(net.named_buffers()))

        def sample_loss(weights: dict[str, torch.Tensor], image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            outputs = functional_call(net, {**weights, **constants}, (image[None],), {"num_heads": num_heads})
            return F.cross_entropy(torch.cat(outputs, 1).float(), label[None])

        per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))
        for batch in batches:
            images, labels = batch[0].to(device), batch[1].to(device)
            grads = per_sample_grad(weights, images, labels)
            total += torch.cat([grads[f"backbone.{n}"].pow(2).flatten(1) for n in names], 1).sum(0).double()
            count += len(labels)
    else:
        saved = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
        net.train()
        params = list(net.backbone.parameters())
        for batch in batches:
            images, labels = batch[0].to(device), batch[1].to(device)
            loss = F.cross_entropy(torch.cat(net(images, num_heads=num_heads), 1).float(), labels)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
            total += flat.double().pow(2) * len(labels)
            count += len(labels)
        net.load_state_dict(saved, strict=False)
    net.train(was_training)
    return total, count


class EWC(IncrementalLearner):
    """EWC on the class-incremental sequence (FACIL ``ewc``: λ = 5000, α = 0.5; ANCL's A-EWC base uses λ = 10000).

    Args:
        lamb: ``λ``.
        fisher_alpha: ``α`` of the merge ``F ← α·F + (1 − α)·F_task``.
        fisher_samples: ``per_sample`` or ``batch`` (see the module docstring).
        **kwargs: ``IncrementalLearner``'s arguments.
    """

    needs_old_net = True

    def __init__(self, *args: Any, lamb: float = 5000.0, fisher_alpha: float = 0.5, fisher_samples: str = "per_sample",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if fisher_samples not in ("per_sample", "batch"):
            raise ValueError(f"fisher_samples must be 'per_sample' or 'batch', got {fisher_samples!r}")
        self.lamb, self.fisher_alpha = lamb, fisher_alpha
        self.backbone_names = [name for name, _ in self.net.backbone.named_parameters()]
        self.register_buffer("fisher", torch.zeros(sum(p.numel() for p in self.net.backbone.parameters())))

    def penalty(self, images: torch.Tensor, outputs: list[torch.Tensor], task: int) -> torch.Tensor:
        theta = backbone_vector(self.net, self.backbone_names)
        return self.lamb * ewc_penalty(theta, backbone_vector(self.old_net, self.backbone_names), self.fisher)

    def task_fisher(self, indices: torch.Tensor, num_heads: int) -> torch.Tensor:
        """The Fisher of ``self.net`` on training-pool items ``indices``, every rank's share summed (exact under DDP
        for ``per_sample``)."""
        total, count = fisher_sums(self.net, self.task_train_loader(indices), num_heads,
                                   per_sample=self.hparams.fisher_samples == "per_sample", device=self.device)
        total = self.trainer.strategy.reduce(total, reduce_op="sum")
        count = self.trainer.strategy.reduce(torch.tensor(float(count), device=self.device), reduce_op="sum")
        return (total / count.clamp(min=1)).to(self.fisher)

    def on_task_trained(self, task: int) -> None:
        request = self.phase_data(task, "main")
        current = self.task_fisher(request, num_heads=task + 1)
        self.fisher.mul_(self.fisher_alpha).add_((1 - self.fisher_alpha) * current)
