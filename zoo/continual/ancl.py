"""ANCL: "Achieving a Better Stability-Plasticity Trade-off via Auxiliary Networks in Continual Learning" (Kim, Noci,
Orvieto & Hofmann, CVPR 2023). Official code: ``kim-sanghwan/ANCL`` (a FACIL fork; ``src/approach/a-lwf.py``,
``a-ewc.py``).

For every task ``t > 0`` an auxiliary network starts as a copy of the current model (``θ_{t−1}`` with the new head),
is trained on task ``t`` alone by plain fine-tuning (cross-entropy on head ``t``; SGD with momentum 0.9 and weight
decay 5e-4, hard-coded in the official ``NewTaskTrainer``) and frozen. The main network then minimises (§3, eq. 5)

    L = L_CE(θ; D_t) + λ·Ω(θ, θ_old) + λ_a·Ω(θ, θ_aux)

with the base method's regulariser ``Ω`` applied a second time toward the plastic auxiliary solution:

* A-LwF: ``λ·KD_T(heads_{<t}(θ), heads_{<t}(θ_old)) + λ_a·KD_T(head_t(θ), head_t(θ_aux))`` (official λ = 10, λ_a = 1,
  T = 2; the code subtracts the task offset from the auxiliary logits, a no-op under the softmax).
* A-EWC: ``λ·Σ F (θ − θ_old)²/2 + λ_a·Σ F_aux (θ − θ_aux)²/2``, ``F_aux`` the auxiliary network's Fisher on task
  ``t``, recomputed every task and not merged (official λ = 10000, λ_a = 10).

The auxiliary network is trained here on task ``t``'s data only, the paper's definition; the official ``train_loop``
adds the exemplars first, which gives the head-``t`` loss negative targets (the spec's pitfall list).
"""

from __future__ import annotations

from typing import Any

import torch

from zoo.continual.ewc import EWC, backbone_vector, ewc_penalty
from zoo.continual.lwf import LwF, distillation_cross_entropy

__all__ = ["ALwF", "AEWC"]


def _auxiliary_optimizer(optimizer: torch.optim.Optimizer, momentum: float, weight_decay: float) -> None:
    """The official ``NewTaskTrainer``'s fixed SGD settings, on the configured optimiser where it has them."""
    for group in optimizer.param_groups:
        if "momentum" in group:
            group["momentum"] = momentum
        if "weight_decay" in group:
            group["weight_decay"] = weight_decay


class ALwF(LwF):
    """A-LwF: LwF with an auxiliary network (see the module docstring).

    Args:
        lamb_a: ``λ_a``, the weight of the distillation to the auxiliary network's head ``t``.
        aux_momentum, aux_weight_decay: the auxiliary phase's SGD settings (official: 0.9, 5e-4).
        **kwargs: ``LwF``'s arguments (``lamb``, ``temperature``, ...).
    """

    auxiliary = True

    def __init__(self, *args: Any, lamb_a: float = 1.0, aux_momentum: float = 0.9, aux_weight_decay: float = 5e-4,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lamb_a = lamb_a

    def configure_auxiliary_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        _auxiliary_optimizer(optimizer, self.hparams.aux_momentum, self.hparams.aux_weight_decay)

    def penalty(self, images: torch.Tensor, outputs: list[torch.Tensor], task: int) -> torch.Tensor:
        with torch.no_grad():
            auxiliary = self.aux_net(images, num_heads=task + 1)[task]
        return (super().penalty(images, outputs, task)
                + self.lamb_a * distillation_cross_entropy(outputs[task], auxiliary, self.temperature))


class AEWC(EWC):
    """A-EWC: EWC with an auxiliary network (see the module docstring).

    Args:
        lamb_a: ``λ_a``, the weight of the quadratic pull toward ``θ_aux``.
        aux_momentum, aux_weight_decay: the auxiliary phase's SGD settings (official: 0.9, 5e-4).
        **kwargs: ``EWC``'s arguments (``lamb``, ``fisher_alpha``, ``fisher_samples``, ...).
    """

    auxiliary = True

    def __init__(self, *args: Any, lamb_a: float = 10.0, aux_momentum: float = 0.9, aux_weight_decay: float = 5e-4,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lamb_a = lamb_a
        self.register_buffer("fisher_aux", torch.zeros_like(self.fisher))

    def configure_auxiliary_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        _auxiliary_optimizer(optimizer, self.hparams.aux_momentum, self.hparams.aux_weight_decay)

    def on_auxiliary_trained(self, task: int) -> None:
        self.fisher_aux.copy_(self.task_fisher(self.phase_data(task, "aux"), num_heads=task + 1))

    def penalty(self, images: torch.Tensor, outputs: list[torch.Tensor], task: int) -> torch.Tensor:
        theta = backbone_vector(self.net, self.backbone_names)
        auxiliary = backbone_vector(self.aux_net, self.backbone_names)
        return super().penalty(images, outputs, task) + self.lamb_a * ewc_penalty(theta, auxiliary, self.fisher_aux)
