"""The exponential-moving-average teacher every mean-teacher method shares.

A frozen copy of a network follows it by an exponential moving average of its weights (Tarvainen & Valpola, "Mean
teachers are better role models", NeurIPS 2017):

    θ_teacher ← m_t · θ_teacher + (1 − m_t) · θ_student        after every update of the student

Meta Pseudo Labels evaluates such an average of its student; Soft Teacher's teacher is one (its momentum ramp is
``m_t = min(m, 1 − 1/(t + 1))``, mmdetection's ``MeanTeacher`` hook); UDA's official code evaluates an EMA of its
model too.

``EMATeacher`` keeps the copy's weights as **buffers**, not parameters. So nothing can train it by accident: it has no
gradient, it is in no optimiser (the CLI's ``optimizer:`` section builds the optimiser from ``model.parameters()``,
which never sees it), and it still moves with ``.to(device)``, is saved in ``state_dict`` and checkpoints, and is
broadcast from rank 0 with the other buffers by DDP, so every rank holds the same teacher.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

__all__ = ["ema_momentum", "frozen_copy", "EMATeacher"]


def ema_momentum(update: int, momentum: float, ramp: bool) -> float:
    """The momentum ``m_t`` of update ``t`` (0-based).

    ``ramp=True``: ``min(m, 1 − 1/(t + 1))``, so early teachers are plain averages of the student's recent weights
    (0, 1/2, 2/3, ... until ``m``). ``ramp=False``: 0 at ``t = 0`` (the teacher starts as a copy) and ``m`` after, as
    ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` does.

    >>> [round(ema_momentum(t, 0.9, ramp=True), 3) for t in range(4)], ema_momentum(1, 0.9, ramp=False)
    ([0.0, 0.5, 0.667, 0.75], 0.9)
    """
    if update == 0:
        return 0.0
    return min(momentum, 1.0 - 1.0 / (update + 1)) if ramp else momentum


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are buffers under the same names: it cannot be trained (no
    gradient, in no optimiser built from ``parameters()``), yet it moves with ``.to``, is saved in ``state_dict``
    (keys equal to ``module``'s, so ``load_state_dict`` copies weights either way) and is broadcast by DDP with the
    other buffers. EMA teachers, and continual learning's previous and auxiliary networks, are such copies."""
    copied = copy.deepcopy(module)
    for submodule in copied.modules():
        for name, parameter in list(submodule._parameters.items()):
            if parameter is not None:
                del submodule._parameters[name]
                submodule.register_buffer(name, parameter.detach().clone())
    return copied


class EMATeacher(nn.Module):
    """An EMA copy of ``student`` (see the module docstring). Call ``update(student)`` after every student step.

    Args:
        student: the network to follow; the teacher is a deep copy of it with every parameter turned into a buffer.
        momentum: ``m`` (MPL: 0.995; Soft Teacher: 0.999).
        ramp: the ramp ``min(m, 1 − 1/(t + 1))`` instead of a copy followed by constant ``m`` (``ema_momentum``).
        include_buffers: also average the student's floating-point buffers (batch-norm running statistics) and copy
            its other buffers; otherwise the teacher's buffers stay as they were copied, which suits teachers whose
            normalisation layers are frozen (Soft Teacher's backbone).

    ``forward`` runs the copy; call it under ``torch.no_grad()`` (nothing in it can receive a gradient anyway).
    ``module`` is the copy itself, so a checkpoint stores the teacher's weights under ``<name>.module.<student key>``.
    """

    def __init__(self, student: nn.Module, momentum: float = 0.999, ramp: bool = True,
                 include_buffers: bool = True) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1), got {momentum}")
        self.momentum, self.ramp, self.include_buffers = momentum, ramp, include_buffers
        self.module = frozen_copy(student)
        # Same names as the student's, in the student's order: update() pairs them by position.
        self._weight_names = [name for name, _ in student.named_parameters()]
        self._buffer_names = [name for name, _ in student.named_buffers()]
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def current_momentum(self) -> float:
        """``m_t`` of the next update."""
        return ema_momentum(int(self.num_updates), self.momentum, self.ramp)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: Optional[float] = None) -> None:
        """One EMA step towards ``student`` (the network the teacher was copied from); ``momentum`` overrides
        ``m_t``."""
        m = self.current_momentum() if momentum is None else momentum
        own = dict(self.module.named_buffers())
        weights = [own[name] for name in self._weight_names]
        student_weights = [p.detach() for p in student.parameters()]
        if len(student_weights) != len(weights):
            raise ValueError(f"EMATeacher.update: the student has {len(student_weights)} parameters, the teacher was "
                             f"copied from one with {len(weights)}")
        floating, other = [], []
        if self.include_buffers:
            for name, buffer in zip(self._buffer_names, (b.detach() for b in student.buffers())):
                (floating if buffer.is_floating_point() else other).append((own[name], buffer))
        targets = weights + [t for t, _ in floating]
        sources = student_weights + [s for _, s in floating]
        if m == 0.0:
            torch._foreach_copy_(targets, sources)
        else:
            # lerp, as AveragedModel's get_ema_multi_avg_fn: bit-identical to it for the same momentum sequence.
            torch._foreach_lerp_(targets, sources, 1.0 - m)
        for target, source in other:
            target.copy_(source)
        self.num_updates += 1
