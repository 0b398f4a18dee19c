"""Meta Pseudo Labels.

Pham, Dai, Xie, Luong & Le, "Meta Pseudo Labels", CVPR 2021. A teacher labels unlabeled images; the student takes one
SGD step on those pseudo labels; the teacher is then rewarded by how much that step lowered the student's loss on
labeled data. With the first-order Taylor approximation every implementation uses (Appendix A; confirmed by the first
author in google-research/google-research#534), the teacher's gradient from the student is

    h · ∇_T CE(ŷ, T(x_u)),    h = CE_l(student before the step) − CE_l(student after the step),

a REINFORCE term: ``h > 0`` (the pseudo label helped) makes the teacher more likely to give ``ŷ`` again. The teacher
also keeps UDA's supervised + consistency objective (§3.2 of the paper, ``zoo.semisup.losses``). Evaluation uses an
EMA of the student; after training, the paper fine-tunes the student on labeled data alone
(``configs/semisup/mpl_finetune_digits.yaml`` does it through the zoo's ``finetune.init_from``).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Any, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from zoo.classifier import ClassificationModule, Classifier
from zoo.ema import EMATeacher
from zoo.schedules import linear_rampup, warmup_cosine
from zoo.semisup.losses import sharpened_consistency
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["batch_norm_stats_frozen", "mpl_coefficient", "MetaPseudoLabels"]


@contextmanager
def batch_norm_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Inside, batch norm still normalises with batch statistics (train mode) but leaves its running stats alone."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 − 0) · running + 0 · batch
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


def mpl_coefficient(loss_before: torch.Tensor, loss_after: torch.Tensor, sign: Literal["theory", "official"]) -> torch.Tensor:
    """The scalar ``h`` that multiplies the teacher's pseudo-label log-likelihood gradient.

    ``theory``: ``before − after``, the first-order meta-gradient (positive when the student's step helped).
    ``official``: ``after − before``, the sign in the released TF and PyTorch code (google-research ``MPL.step_fn``,
    kekmodel/MPL-pytorch ``main.py``; discussed in kekmodel/MPL-pytorch#6). It is kept for reproduction; the unit
    test in ``tests/test_semisup.py`` shows it moves the teacher *away* from a pseudo label that helps.
    """
    if sign == "theory":
        return (loss_before - loss_after).detach().float()
    if sign == "official":
        return (loss_after - loss_before).detach().float()
    raise ValueError(f"mpl_sign must be 'theory' or 'official', got {sign!r}")


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every layer re-initialised (the student does not start as the teacher's twin)."""
    clone = copy.deepcopy(module)
    for m in clone.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return clone


class MetaPseudoLabels(ClassificationModule):
    """Teacher and student trained together with manual optimisation (two SGD optimizers, two schedules).

    One step (``training_step``), as in the paper's Algorithm 1 and the PyTorch port's ordering:

    1. teacher forward on ``[x_l, x_weak, x_strong]``: UDA loss (label-smoothed CE + ramped, confidence-masked
       consistency between the sharpened weak-view and the strong-view prediction); hard pseudo labels
       ``ŷ = argmax T(x_weak)``;
    2. student loss ``CE(S(x_strong), ŷ)``; its labeled loss ``CE_l`` is measured just before and just after the
       student's SGD step, both times on the same labeled batch in the same batch-norm mode (running statistics
       untouched), so ``h`` measures the step and nothing else;
    3. teacher loss ``UDA + h · CE(T(x_weak), ŷ)``, teacher step.

    Args:
        backbone: teacher feature extractor (``out_channels``), given by ``class_path``.
        num_classes: number of classes.
        student_backbone: the student's; default: a re-initialised copy of ``backbone``.
        dropout: before each classifier's linear layer (0.2 in the PyTorch port).
        teacher_lr, student_lr, momentum, nesterov, weight_decay: the two SGD optimizers (0.05, 0.05, 0.9, Nesterov,
            5e-4 for CIFAR-10-4K).
        warmup_steps: linear warm-up of both learning rates, then a half cosine to zero (``cosine_cycles`` 0.5).
        student_wait_steps: the student's learning rate stays 0 this long (3000 in the port), then warms up.
        label_smoothing: on the teacher's supervised CE and the student's pseudo-label CE (0.15).
        temperature, confidence_threshold: the teacher's UDA target sharpening and mask (0.7 and 0.6; the mask is on
            the sharpened probabilities, as in both official codes).
        uda_weight, uda_steps: ``λ_u · min(1, (t + 1) / uda_steps)`` (8 and 5000).
        mpl_sign: ``theory`` (default) or ``official``, see ``mpl_coefficient``.
        baseline_decay: if set, subtract a moving average of ``h`` (decay 0.99 in the TF code) to reduce variance.
        ema_decay: decay of the evaluated student EMA (0.995; ``zoo.ema.EMATeacher``, copied at the first step).
        gradient_clip_val: global-norm clip of each network's gradients (off by default, as in the port).

    DDP: both networks' gradients are averaged over ranks by two separate backward passes, so the strategy must be
    ``ddp_find_unused_parameters_true`` (each pass leaves the other network's parameters unused), and ``h`` is averaged
    over ranks before it scales the teacher's gradient.

    ``trainer.global_step`` counts optimizer steps, two per batch here (Lightning-AI/pytorch-lightning#17958), so
    ``max_steps: 2N`` trains ``N`` batches; schedules use ``mpl_step``, a checkpointed count of batches.
    """

    # Each optimizer's backward pass leaves the other group without gradient: under DDP the zoo CLI turns a plain
    # `strategy: ddp` into DDPStrategy(find_unused_parameters=True) for modules that say so here.
    ddp_find_unused_parameters = True

    def __init__(
        self,
        *,
        backbone: nn.Module,
        num_classes: int,
        student_backbone: Optional[nn.Module] = None,
        dropout: float = 0.0,
        teacher_lr: float = 0.05,
        student_lr: float = 0.05,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        warmup_steps: int = 0,
        student_wait_steps: int = 0,
        cosine_cycles: float = 0.5,
        label_smoothing: float = 0.15,
        temperature: float = 0.7,
        confidence_threshold: float = 0.6,
        uda_weight: float = 8.0,
        uda_steps: int = 5000,
        mpl_sign: Literal["theory", "official"] = "theory",
        baseline_decay: Optional[float] = None,
        ema_decay: float = 0.995,
        gradient_clip_val: Optional[float] = None,
    ) -> None:
        super().__init__(num_classes=num_classes)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        mpl_coefficient(torch.zeros(()), torch.zeros(()), mpl_sign)  # a wrong sign name fails at construction
        self.automatic_optimization = False
        self.teacher = Classifier(backbone, num_classes, dropout)
        self.student = Classifier(student_backbone if student_backbone is not None else _fresh_copy(backbone),
                                  num_classes, dropout)
        self.student_ema = EMATeacher(self.student, ema_decay, ramp=False)
        self.register_buffer("mpl_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("moving_h", torch.zeros(()))
        self.val_teacher_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The evaluated model: the student's EMA."""
        return self.student_ema(images)

    def total_mpl_steps(self) -> int:
        """Batches in the whole run (``max_steps`` counts two optimizer steps per batch)."""
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return max(1, trainer.max_steps // 2)
        total = trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) else 1

    def student_labeled_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), batch_norm_stats_frozen(self.student):
            return F.cross_entropy(self.student(images).float(), labels)

    def _step(self, optimizer: Any, scheduler: Any, loss: torch.Tensor) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.hparams.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gradient_clip_val,
                                gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler.step()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        opt_teacher, opt_student = self.optimizers()
        sched_teacher, sched_student = self.lr_schedulers()
        images_l, labels_l = batch["labeled"]
        (images_weak, images_strong), hidden_labels = batch["unlabeled"]
        sizes = [len(images_l), len(images_weak), len(images_strong)]

        # 1. Teacher: UDA objective on one joint forward pass; hard pseudo labels from the weak view.
        t_l, t_weak, t_strong = self.teacher(torch.cat([images_l, images_weak, images_strong])).split(sizes)
        t_sup = F.cross_entropy(t_l.float(), labels_l, label_smoothing=hp.label_smoothing)
        t_consistency, mask = sharpened_consistency(t_weak, t_strong, hp.temperature, hp.confidence_threshold,
                                                    mask_on_sharpened=True)
        uda_weight = hp.uda_weight * linear_rampup(int(self.mpl_step) + 1, hp.uda_steps)
        pseudo_labels = t_weak.detach().argmax(-1)

        # 2. Student: one step on the pseudo labels, its labeled loss measured on either side of the step.
        loss_before = self.student_labeled_loss(images_l, labels_l)
        s_strong = self.student(images_strong)
        s_loss = F.cross_entropy(s_strong.float(), pseudo_labels, label_smoothing=hp.label_smoothing)
        self._step(opt_student, sched_student, s_loss)
        self.student_ema.update(self.student)
        loss_after = self.student_labeled_loss(images_l, labels_l)

        # 3. Teacher: rewarded by the student's improvement (REINFORCE on the label it sampled, first-order h).
        # Under DDP the mean of the ranks' h is exactly h on the global labeled batch (equal shares), so every rank
        # scales its pseudo-label gradient alike and the averaged teacher gradient equals the one-process one.
        h = self.trainer.strategy.reduce(mpl_coefficient(loss_before, loss_after, hp.mpl_sign), reduce_op="mean")
        if hp.baseline_decay is not None:
            self.moving_h.mul_(hp.baseline_decay).add_((1 - hp.baseline_decay) * h)
            h = h - self.moving_h
        t_mpl = h * F.cross_entropy(t_weak.float(), pseudo_labels)
        t_loss = t_sup + uda_weight * t_consistency + t_mpl
        self._step(opt_teacher, sched_teacher, t_loss)
        self.mpl_step += 1

        logs = {"teacher_loss": t_loss.detach(), "teacher_sup_loss": t_sup.detach(),
                "teacher_consistency": t_consistency.detach(), "mask_rate": mask.float().mean(),
                "uda_weight": uda_weight, "student_loss": s_loss.detach(), "mpl_h": h,
                "moving_h": self.moving_h.clone(), "student_labeled_loss": loss_after}
        known = hidden_labels >= 0
        if known.any():
            logs["pseudo_label_acc"] = (pseudo_labels[known] == hidden_labels[known]).float().mean()
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False,
                      batch_size=len(labels_l))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch[0], batch[1]
        self.evaluation_step(batch, "val")
        self.val_teacher_acc(self.teacher(images), labels)
        self.log("val/teacher_acc", self.val_teacher_acc, on_epoch=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        total = self.total_mpl_steps()

        def sgd(params: Any, lr: float) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=lr, momentum=hp.momentum, nesterov=hp.nesterov,
                                   weight_decay=hp.weight_decay)

        opt_teacher = sgd(self.teacher.parameters(), hp.teacher_lr)
        opt_student = sgd(self.student.parameters(), hp.student_lr)
        wait = hp.student_wait_steps
        sched_teacher = torch.optim.lr_scheduler.LambdaLR(
            opt_teacher, lambda step: warmup_cosine(step, total, hp.warmup_steps, hp.cosine_cycles))
        sched_student = torch.optim.lr_scheduler.LambdaLR(
            opt_student,
            lambda step: 0.0 if step < wait else warmup_cosine(step - wait, total - wait, hp.warmup_steps,
                                                                hp.cosine_cycles))
        return [opt_teacher, opt_student], [sched_teacher, sched_student]
