"""Learning without Forgetting (Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017), as FACIL runs it.

While learning task ``t``, the old heads' outputs on the new images are distilled from the model frozen after task
``t − 1`` (``θ_old``): ``L = CE(head_t) + λ · KD_T(heads_{<t}(θ), heads_{<t}(θ_old))`` with FACIL's
``cross_entropy``: both softmaxes raised to the power ``1/T`` and renormalised (T = 2, the paper's eq. 2), ``1e-5/C``
added to the student's probabilities and renormalised, cross-entropy averaged over the batch (``src/approach/lwf.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from zoo.continual.incremental import IncrementalLearner

__all__ = ["distillation_cross_entropy", "LwF"]


def distillation_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
                               eps: float = 1e-5) -> torch.Tensor:
    """FACIL's ``LwF.cross_entropy(outputs, targets, exp=1/T)``: the batch mean of ``−Σ_c q_c log p_c`` with
    ``p ∝ softmax(student)^{1/T}`` (then ``+ eps/C``, renormalised) and ``q ∝ softmax(teacher)^{1/T}``.

    ``softmax(x)^{1/T}`` renormalised is exactly ``softmax(x / T)``, which is how it is computed here: FACIL's
    ``pow(1/T)`` of a probability that underflowed to 0 has an infinite gradient, and a run whose logits grow apart
    (seed 1 of the digits LwF run did, at task 1) then turns its weights into NaN.

    >>> round(float(distillation_cross_entropy(torch.zeros(1, 4), torch.zeros(1, 4))), 4)  # uniform: log 4
    1.3863
    """
    student = torch.softmax(student_logits.float() / temperature, dim=1)
    teacher = torch.softmax(teacher_logits.float() / temperature, dim=1)
    student = (student + eps / student.shape[1]) / (1 + eps)  # FACIL's "+ eps/C, renormalised"
    return -(teacher * student.log()).sum(1).mean()


class LwF(IncrementalLearner):
    """LwF on the class-incremental sequence (FACIL ``lwf``: λ = 1 by default there, 10 in ANCL's CIFAR runs; T = 2).

    Args:
        lamb: ``λ``, the weight of the distillation to the previous model.
        temperature: ``T``.
        **kwargs: ``IncrementalLearner``'s arguments.
    """

    needs_old_net = True

    def __init__(self, *args: Any, lamb: float = 10.0, temperature: float = 2.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lamb, self.temperature = lamb, temperature

    def penalty(self, images: torch.Tensor, outputs: list[torch.Tensor], task: int) -> torch.Tensor:
        with torch.no_grad():
            old = self.old_net(images, num_heads=task)
        return self.lamb * distillation_cross_entropy(torch.cat(outputs[:task], 1), torch.cat(old, 1), self.temperature)
