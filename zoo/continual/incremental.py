"""Class-incremental learning on Lightning: a task sequence inside one ``Trainer.fit``, FACIL's protocol.

The continual-learning family (``zoo.continual``) follows FACIL (Masana et al., "Class-incremental learning: survey
and performance evaluation", TPAMI 2022; ``mmasana/FACIL``), which ANCL's official code forks:

* ``MultiHeadNet``: a zoo backbone with one linear head per task (FACIL's ``LLL_Net``): head ``t`` scores the
  classes of task ``t``, whose global labels start at ``task_offsets[t]``.
* Task-aware (TAw) accuracy: the true task's head decides; task-agnostic (TAg): the argmax over all seen heads
  (FACIL ``calculate_metrics``). ``TaskAccuracy`` counts both per task, summed over DDP ranks.
* The accuracy matrices ``acc[t, u]`` (accuracy on task ``u``'s test split after learning task ``t``), and from them
  ``average_accuracy``, ``forgetting`` (FACIL: ``max_{t' < t} acc[t', u] − acc[t, u]``) and ``backward_transfer``
  (Lopez-Paz & Ranzato 2017).
* Exemplar memories (``herding_selection``, iCaRL's herding as FACIL implements it; ``random_selection``).
* ``IncrementalLearner``: the LightningModule base. Alone it is FACIL's ``finetune`` (or, with ``joint: true``, the
  ``joint`` upper bound); ``zoo.continual.lwf``, ``zoo.continual.ewc`` and ``zoo.continual.ancl`` add their
  regularisers through ``penalty``.

Why one ``fit`` for the whole sequence. LightningCLI runs one ``Trainer.fit``; a driver calling ``fit`` once per
task would sit outside the CLI (its config, logger, DDP launch, precision and ``--ckpt_path last`` would have to be
rebuilt around it). Here the sequence is a fixed schedule of *phases* of ``epochs_per_task`` epochs each: for every
task ``t``, ANCL's auxiliary phase (``t > 0`` with an auxiliary network) and then the main phase. ``trainer.current_epoch``
says which phase runs; the training loader is rebuilt every epoch (``reload_dataloaders_every_n_epochs = 1``) for the
phase's data; at a phase's first step the optimiser and LR schedule are built afresh (FACIL builds one per task: no
momentum carries over); after a phase's last epoch the phase is *finalised* (the previous-model snapshot, Fisher,
exemplars, the test row of the accuracy matrices). All of it is model state or buffers, so ``last.ckpt`` holds it, and
a run killed anywhere resumes at the same task, phase, epoch and step. A phase that ended just before a checkpoint
and was not finalised yet (a checkpoint written after validation) is finalised when the next phase asks for its data,
from the same weights, so the result is the same.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, NamedTuple, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchmetrics import Metric

from zoo.callbacks import log_images, log_table
from zoo.checkpoint import drop_module_hyperparameters
from zoo.contracts import feature_channels
from zoo.ema import frozen_copy

__all__ = [
    "Phase", "phase_schedule", "MultiHeadNet", "TaskAccuracy", "average_accuracy", "forgetting", "backward_transfer",
    "herding_selection", "random_selection", "accuracy_heatmap", "IncrementalLearner",
]


class Phase(NamedTuple):
    """One stretch of ``epochs_per_task`` epochs: ``stage`` ``"aux"`` (ANCL's auxiliary network) or ``"main"``."""

    index: int  # position in the schedule
    task: int
    stage: str
    epoch: int  # epoch within the phase


def phase_schedule(num_tasks: int, auxiliary: bool) -> list[tuple[int, str]]:
    """``(task, stage)`` of every phase in order: ``main`` per task, preceded by ``aux`` for ``t > 0`` when
    ``auxiliary`` (ANCL §3: the auxiliary network is trained on task ``t`` before the main network).

    >>> phase_schedule(3, auxiliary=True)
    [(0, 'main'), (1, 'aux'), (1, 'main'), (2, 'aux'), (2, 'main')]
    """
    phases = []
    for task in range(num_tasks):
        if auxiliary and task > 0:
            phases.append((task, "aux"))
        phases.append((task, "main"))
    return phases


def _offsets(task_classes: Sequence[int]) -> list[int]:
    return [sum(task_classes[:t]) for t in range(len(task_classes))]


class MultiHeadNet(nn.Module):
    """A feature-map backbone, global average pooling and one linear head per task (FACIL's ``LLL_Net``).

    All heads exist from the start (their sizes are the data's task split), so a checkpoint's tensors never change
    shape as tasks arrive; a head is simply not trained or evaluated before its task. ``forward`` returns the list of
    per-head logits ``[(B, task_classes[t]) for t < num_heads]``.
    """

    def __init__(self, backbone: nn.Module, task_classes: Sequence[int]) -> None:
        super().__init__()
        self.backbone = backbone
        channels = feature_channels(backbone)
        self.heads = nn.ModuleList(nn.Linear(channels, n) for n in task_classes)
        self.task_classes = list(task_classes)
        self.task_offsets = _offsets(task_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor, num_heads: Optional[int] = None) -> list[torch.Tensor]:
        features = self.features(images)
        return [head(features) for head in self.heads[: num_heads or len(self.heads)]]


class TaskAccuracy(Metric):
    """Per-task task-aware and task-agnostic accuracy, as counts summed over DDP ranks (exact).

    ``update(logits, labels, task)``: ``logits`` are the seen heads concatenated ``(B, Σ seen classes)``, ``labels``
    global, every item of task ``task`` (one evaluation loader per task). TAw predicts within the task's own slice;
    TAg over all columns. ``compute()`` returns ``(acc_taw, acc_tag, loss)``: ``(num_tasks,)`` accuracies, NaN for tasks
    without items, and the task-agnostic cross-entropy averaged over all items.
    """

    full_state_update = False

    def __init__(self, task_classes: Sequence[int]) -> None:
        super().__init__()
        self.task_classes, self.task_offsets = list(task_classes), _offsets(task_classes)
        num_tasks = len(task_classes)
        for name in ("correct_taw", "correct_tag", "total"):
            self.add_state(name, default=torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("loss_sum", default=torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, task: int) -> None:
        start, size = self.task_offsets[task], self.task_classes[task]
        taw = logits[:, start: start + size].argmax(1) + start
        tag = logits.argmax(1)
        self.correct_taw[task] += (taw == labels).sum()
        self.correct_tag[task] += (tag == labels).sum()
        self.total[task] += len(labels)
        self.loss_sum[task] += F.cross_entropy(logits.float(), labels, reduction="sum").double()

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        total = self.total.double()
        nan = torch.full_like(total, float("nan"))
        return (torch.where(total > 0, self.correct_taw / total, nan),
                torch.where(total > 0, self.correct_tag / total, nan),
                self.loss_sum.sum() / total.sum().clamp(min=1))


def average_accuracy(matrix: torch.Tensor) -> torch.Tensor:
    """``avg[t] = mean_{u ≤ t} acc[t, u]`` for every learned task ``t`` (FACIL ``avg_accs``)."""
    rows = torch.arange(len(matrix))
    seen = rows[None, :] <= rows[:, None]
    return torch.where(seen, matrix, 0).sum(1) / seen.sum(1)


def forgetting(matrix: torch.Tensor) -> torch.Tensor:
    """``f[t, u] = max_{t' < t} acc[t', u] − acc[t, u]`` for ``u < t``, else 0 (FACIL ``forg``).

    >>> forgetting(torch.tensor([[0.9, 0.0], [0.6, 0.8]]))
    tensor([[0.0000, 0.0000],
            [0.3000, 0.0000]])
    """
    num_tasks = len(matrix)
    out = torch.zeros_like(matrix)
    earlier = torch.where(torch.isnan(matrix), float("-inf"), matrix)
    best_before = torch.cummax(earlier, dim=0).values  # best_before[t] = max over t' ≤ t
    out[1:] = best_before[:-1] - matrix[1:]
    lower = torch.arange(num_tasks)[None, :] < torch.arange(num_tasks)[:, None]
    return torch.where(lower, out, 0)


def backward_transfer(matrix: torch.Tensor) -> torch.Tensor:
    """BWT (Lopez-Paz & Ranzato 2017, GEM eq. 3): ``mean_{u < T−1} (acc[T−1, u] − acc[u, u])``; 0 for one task."""
    last = len(matrix) - 1
    if last == 0:
        return matrix.new_zeros(())
    return (matrix[last, :last] - matrix.diagonal()[:last]).mean()


def herding_selection(features: torch.Tensor, labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """iCaRL's herding (Rebuffi et al. 2017, Alg. 4) as FACIL's ``HerdingExemplarsSelector`` runs it: features are L2
    normalised; the ``k``-th exemplar of a class is the unselected item ``i`` that minimises
    ``‖μ − (Σ_selected f + f_i) / k‖``, ties to the lowest index. Returns the selected indices, class by class in
    ascending class order, each class's in selection order (so a prefix is a smaller herding memory).

    All classes run at once: the items are padded into ``(C, n_max, d)``; the only loop is over ``k``, the greedy
    order herding is defined by.
    """
    features = F.normalize(features.float(), dim=1)
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    num_classes, n_max = len(classes), int(counts.max())
    order = torch.argsort(inverse, stable=True)  # items grouped by class, in index order within a class
    slot = torch.arange(len(labels)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    padded = features.new_zeros(num_classes, n_max, features.shape[1])
    padded[inverse[order], slot] = features[order]
    index = torch.full((num_classes, n_max), -1, dtype=torch.long)
    index[inverse[order], slot] = order
    available = index >= 0
    mean = padded.sum(1) / counts[:, None]
    running = torch.zeros_like(mean)
    picks = []
    for k in range(1, min(per_class, n_max) + 1):
        distance = (mean[:, None, :] - (running[:, None, :] + padded) / k).norm(dim=2)
        distance = distance.masked_fill(~available, float("inf"))
        best = distance.argmin(1)
        rows = torch.arange(num_classes)
        has_item = available[rows, best]
        running = running + padded[rows, best] * has_item[:, None]
        available[rows, best] = False
        picks.append(torch.where(has_item, index[rows, best], -1))
    selected = torch.stack(picks, 1)  # (C, k): class c's exemplars in selection order
    return selected[selected >= 0]


def random_selection(labels: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """``per_class`` items of every class drawn uniformly without replacement (FACIL's ``RandomExemplarsSelector``),
    in ascending class order."""
    keys = torch.rand(len(labels), generator=generator)
    order = torch.argsort(keys)
    order = order[torch.argsort(labels[order], stable=True)]  # grouped by class, random within a class
    classes, counts = torch.unique(labels, return_counts=True)
    rank = torch.arange(len(labels)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return order[rank < per_class]


def accuracy_heatmap(matrix: torch.Tensor, cell: int = 24) -> torch.Tensor:
    """The accuracy matrix as an RGB image ``(3, T·cell, T·cell)``: dark blue (0) → yellow (1), grey where a task is
    not learned yet; rows are "after task t", columns "task u"."""
    value = matrix.float().nan_to_num(-1).clamp(max=1)
    low, high = torch.tensor([0.15, 0.1, 0.4]), torch.tensor([1.0, 0.85, 0.1])
    weight = value.clamp(min=0)[..., None]
    rgb = low * (1 - weight) + high * weight
    rgb[value < 0] = 0.5
    return rgb.permute(2, 0, 1).repeat_interleave(cell, 1).repeat_interleave(cell, 2)


class IncrementalLearner(L.LightningModule):
    """A multi-head network learning the data's tasks one after another (FACIL's ``finetune`` and ``joint``).

    Training data per phase (the datamodule asks ``training_request()``): the current task's training split plus
    the exemplar memory, or every task so far with ``joint``. The loss is FACIL's: cross-entropy on the current task's
    head (targets minus the task offset) without exemplars; over all seen heads with global targets when exemplars or
    ``joint`` are used. Subclasses add ``penalty`` (LwF, EWC, ANCL).

    After each task's main phase the model tests every seen task (``acc_taw[t, :t+1]``, ``acc_tag[t, :t+1]``) and
    logs the rows, the matrices as heatmaps and CSV tables (``<run>/tables/cl_acc_tag.csv`` ...), the average accuracy,
    forgetting and the stability/plasticity pair (``cl/old_tasks_acc_*``: mean over ``u < t``; ``cl/new_task_acc_*``:
    ``u = t``). ``zoo test`` tests the seen tasks and reports the matrices' summary.

    Args:
        backbone: any zoo feature-map backbone.
        task_classes: classes per task, as the datamodule splits them (checked in ``setup``).
        epochs_per_task: epochs of every phase; ``trainer.max_epochs`` is set to the whole schedule.
        joint: train on all tasks so far (the upper bound) instead of the current one.
        exemplars_per_class: a memory of this many images per seen class (FACIL ``--num-exemplars-per-class``).
        exemplar_budget: a fixed memory of this many images shared by the seen classes (``--num-exemplars``); at most
            one of the two is non-zero.
        exemplar_selection: ``herding`` or ``random``.
        fix_bn: batch-norm layers in evaluation mode from the second task on (FACIL ``--fix-bn``).
        lr: the learning rate of the fallback SGD (momentum 0.9) when no ``optimizer:`` is configured.
        seed: seeds the random exemplar selection.
    """

    #: subclasses that regularise towards the previous model keep a frozen snapshot of it
    needs_old_net: bool = False
    #: ANCL: an auxiliary phase before each main phase from the second task on
    auxiliary: bool = False
    #: heads and, in the auxiliary phase, the old heads get no gradient in some steps
    ddp_find_unused_parameters: bool = True

    def __init__(
        self,
        backbone: nn.Module,
        task_classes: Sequence[int],
        epochs_per_task: int = 15,
        joint: bool = False,
        exemplars_per_class: int = 0,
        exemplar_budget: int = 0,
        exemplar_selection: str = "herding",
        fix_bn: bool = False,
        lr: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        drop_module_hyperparameters(self)
        if exemplars_per_class and exemplar_budget:
            raise ValueError("set exemplars_per_class or exemplar_budget, not both")
        if exemplar_selection not in ("herding", "random"):
            raise ValueError(f"exemplar_selection must be 'herding' or 'random', got {exemplar_selection!r}")
        if epochs_per_task < 1:
            raise ValueError(f"epochs_per_task must be ≥ 1, got {epochs_per_task}")
        self.net = MultiHeadNet(backbone, task_classes)
        self.task_classes, self.task_offsets = list(task_classes), _offsets(task_classes)
        self.num_tasks = len(task_classes)
        self.phases = phase_schedule(self.num_tasks, self.auxiliary)
        if self.needs_old_net or self.auxiliary:
            self.old_net = frozen_copy(self.net).eval()
        if self.auxiliary:
            self.aux_net = frozen_copy(self.net).eval()
        # −1 until measured (a NaN would trip the non-finite checkpoint guard); ``accuracy_matrix`` shows NaN there
        unknown = torch.full((self.num_tasks, self.num_tasks), -1.0)
        self.register_buffer("acc_taw", unknown.clone())
        self.register_buffer("acc_tag", unknown.clone())
        self.register_buffer("phases_finalized", torch.zeros((), dtype=torch.long))
        self.register_buffer("optimizer_phase", torch.zeros((), dtype=torch.long))
        self.exemplar_indices = torch.zeros(0, dtype=torch.long)  # pool indices; saved by on_save_checkpoint
        self._fresh_optimizer_states: Optional[list[dict]] = None
        self._fresh_scheduler_states: list[dict] = []
        self.val_accuracy = TaskAccuracy(task_classes)
        self.test_accuracy = TaskAccuracy(task_classes)
        self.row_accuracy = TaskAccuracy(task_classes)

    # ---- the schedule --------------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return sum(self.task_classes)

    @property
    def total_epochs(self) -> int:
        return len(self.phases) * self.hparams.epochs_per_task

    def phase_at(self, epoch: int) -> Phase:
        index = min(epoch // self.hparams.epochs_per_task, len(self.phases) - 1)
        task, stage = self.phases[index]
        return Phase(index, task, stage, epoch - index * self.hparams.epochs_per_task)

    @property
    def phase(self) -> Phase:
        return self.phase_at(self.trainer.current_epoch if self._trainer is not None else 0)

    def tasks_learned(self) -> int:
        """Tasks whose main phase is finalised."""
        done = self.phases[: int(self.phases_finalized)]
        return sum(stage == "main" for _, stage in done)

    def seen_tasks(self) -> int:
        """How many tasks the evaluation loaders cover: up to the current one while fitting, else those learned."""
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            return self.phase.task + 1
        return max(self.tasks_learned(), 1)

    def uses_exemplars(self) -> bool:
        return bool(self.hparams.exemplars_per_class or self.hparams.exemplar_budget)

    def training_request(self) -> dict[str, Any]:
        """What the datamodule's training loader serves this epoch: ``{"tasks": [...], "extra_indices": pool indices}``.
        Finalises a phase that ended without being finalised (see the module docstring) first."""
        self._catch_up()
        return self._request(self.phase.task, self.phase.stage)

    def _request(self, task: int, stage: str) -> dict[str, Any]:
        if stage == "aux":  # ANCL: the auxiliary network learns the new task only (no exemplars)
            return {"tasks": [task], "extra_indices": torch.zeros(0, dtype=torch.long)}
        tasks = list(range(task + 1)) if self.hparams.joint else [task]
        return {"tasks": tasks, "extra_indices": self.exemplar_indices.clone()}

    def phase_data(self, task: int, stage: str) -> torch.Tensor:
        """The training-pool indices a phase trains on (its tasks' items and the memory, without repeats)."""
        request = self._request(task, stage)
        indices = self._datamodule().train_indices(request["tasks"])
        return torch.cat([indices, request["extra_indices"].to(indices)]).unique()

    # ---- Lightning hooks -----------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(datamodule, "task_classes", None)
        if data_classes is not None and list(data_classes) != self.task_classes:
            raise ValueError(f"model.task_classes is {self.task_classes} but the data splits its classes as "
                             f"{list(data_classes)}: set `model.init_args.task_classes: {list(data_classes)}`")
        if stage != "fit":
            return
        self.trainer.reload_dataloaders_every_n_epochs = 1  # every phase has its own data
        if self.trainer.max_epochs != self.total_epochs and not self.trainer.fast_dev_run:
            if self.trainer.max_epochs not in (None, -1, 1000):
                warnings.warn(f"trainer.max_epochs {self.trainer.max_epochs} replaced by the task schedule's "
                              f"{self.total_epochs} ({len(self.phases)} phases × {self.hparams.epochs_per_task} "
                              "epochs); set model.init_args.epochs_per_task instead", stacklevel=2)
            self.trainer.fit_loop.max_epochs = self.total_epochs
        for callback in self.trainer.callbacks:
            if isinstance(callback, ModelCheckpoint):
                # Checkpoints at an epoch's end come after on_train_epoch_end, which finalises a phase.
                callback._save_on_train_epoch_end = True

    def train(self, mode: bool = True) -> "IncrementalLearner":
        super().train(mode)
        for name in ("old_net", "aux_net"):
            if hasattr(self, name):
                getattr(self, name).eval()  # frozen teachers: batch norm uses and keeps its running statistics
        if mode and self.hparams.fix_bn and self._trainer is not None and self.phase.task > 0:
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def configure_optimizers(self) -> Any:
        """Fallback when the CLI has no ``optimizer:`` section: SGD, momentum 0.9 (FACIL's optimiser)."""
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def _ensure_phase_optimizer(self) -> None:
        """A fresh optimiser and LR schedule at a phase's first step (FACIL's ``_get_optimizer`` per task), once:
        ``optimizer_phase`` is in the checkpoint, so a run resumed inside a phase keeps that phase's optimiser state."""
        phase = self.phase
        if int(self.optimizer_phase) == phase.index:
            return
        if self._fresh_optimizer_states is None:
            raise RuntimeError("the optimisers' initial states were not recorded (on_fit_start did not run)")
        # LightningCLI hands the same optimiser object back on every configure_optimizers call, so "fresh" is its
        # state before the first step, recorded in on_fit_start (before a resumed run loads its saved state).
        for optimizer, state in zip(self.trainer.optimizers, self._fresh_optimizer_states):
            optimizer.load_state_dict(copy.deepcopy(state))
        for config, state in zip(self.trainer.lr_scheduler_configs, self._fresh_scheduler_states):
            config.scheduler.load_state_dict(copy.deepcopy(state))
        if phase.stage == "aux":
            self.configure_auxiliary_optimizer(self.trainer.optimizers[0])
        self.optimizer_phase.fill_(phase.index)

    def configure_auxiliary_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook for the auxiliary phase's optimiser (ANCL hard-codes its settings); nothing here."""

    def on_fit_start(self) -> None:
        self._fresh_optimizer_states = [copy.deepcopy(o.state_dict()) for o in self.trainer.optimizers]
        self._fresh_scheduler_states = [copy.deepcopy(c.scheduler.state_dict())
                                        for c in self.trainer.lr_scheduler_configs]

    def on_train_epoch_start(self) -> None:
        self._ensure_phase_optimizer()
        self.train(True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._ensure_phase_optimizer()  # a resume on a phase's first epoch skips on_train_epoch_start

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        phase = self.phase
        task, offset = phase.task, self.task_offsets[phase.task]
        outputs = self.net(images, num_heads=task + 1)
        if phase.stage == "main" and (self.hparams.joint or self.uses_exemplars()):
            cross_entropy = F.cross_entropy(torch.cat(outputs, 1).float(), labels)
        else:
            cross_entropy = F.cross_entropy(outputs[task].float(), labels - offset)
        loss = cross_entropy
        if phase.stage == "main" and task > 0:
            penalty = self.penalty(images, outputs, task)
            loss = loss + penalty
            self.log("train/penalty", penalty, on_step=True, on_epoch=True, batch_size=len(labels))
        self.log("train/ce", cross_entropy, on_step=True, on_epoch=True, batch_size=len(labels))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log("train/task", float(task), on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def penalty(self, images: torch.Tensor, outputs: list[torch.Tensor], task: int) -> torch.Tensor:
        """The method's regulariser for a main-phase batch of task ``task > 0`` (0 for finetune and joint)."""
        return outputs[0].new_zeros(())

    def on_train_epoch_end(self) -> None:
        phase = self.phase
        if phase.epoch == self.hparams.epochs_per_task - 1 and int(self.phases_finalized) == phase.index:
            self._finalize_phase(phase.index)

    def on_train_end(self) -> None:
        self._catch_up(through=min(self.trainer.current_epoch // self.hparams.epochs_per_task, len(self.phases)))

    # ---- evaluation ----------------------------------------------------------------------------------------------

    def _seen_logits(self, images: torch.Tensor, seen: int) -> torch.Tensor:
        return torch.cat(self.net(images, num_heads=seen), 1).float()

    def _evaluation_step(self, batch: Any, task: int, metric: TaskAccuracy, stage: str) -> None:
        images, labels = batch[0], batch[1]
        metric.update(self._seen_logits(images, self.seen_tasks()), labels, task)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, dataloader_idx, self.val_accuracy, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, dataloader_idx, self.test_accuracy, "test")

    def _log_task_accuracy(self, metric: TaskAccuracy, stage: str) -> None:
        acc_taw, acc_tag, loss = metric.compute()
        metric.reset()
        seen = self.seen_tasks()
        self.log(f"{stage}/loss", loss.float())
        self.log(f"{stage}/acc_taw", acc_taw[:seen].nanmean().float(), prog_bar=stage == "val")
        self.log(f"{stage}/acc_tag", acc_tag[:seen].nanmean().float(), prog_bar=True)
        for u in range(seen):
            self.log(f"{stage}/task_{u}/acc_tag", acc_tag[u].float())
            self.log(f"{stage}/task_{u}/acc_taw", acc_taw[u].float())

    def on_validation_epoch_end(self) -> None:
        self._log_task_accuracy(self.val_accuracy, "val")

    def on_test_epoch_end(self) -> None:
        self._log_task_accuracy(self.test_accuracy, "test")
        learned = self.tasks_learned()
        if learned:
            for kind in ("tag", "taw"):
                matrix = self.accuracy_matrix(kind)[:learned, :learned]
                self.log(f"test/sequence_avg_acc_{kind}", float(average_accuracy(matrix)[-1]))
                self.log(f"test/sequence_forgetting_{kind}", float(forgetting(matrix)[-1, : learned - 1].mean())
                         if learned > 1 else 0.0)
                self.log(f"test/sequence_bwt_{kind}", float(backward_transfer(matrix)))

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Task-agnostic class probabilities over the learned tasks' heads: ``{"probs", "preds"}`` (global labels)."""
        images = batch["image"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self._seen_logits(images, self.seen_tasks()).softmax(-1)
        return {"probs": probs, "preds": probs.argmax(-1)}

    def prediction_writer(self) -> Any:
        from zoo.classifier import ClassificationPredictionWriter  # noqa: PLC0415

        return ClassificationPredictionWriter()

    # ---- the end of a phase --------------------------------------------------------------------------------------

    def _catch_up(self, through: Optional[int] = None) -> None:
        """Finalise the phase before the current one if it ended without being finalised."""
        if self._trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return
        target = self.phase.index if through is None else through
        while int(self.phases_finalized) < target:
            self._finalize_phase(int(self.phases_finalized))

    @torch.no_grad()
    def _copy_net(self, source: nn.Module, target: nn.Module) -> None:
        target.load_state_dict(source.state_dict())

    def _finalize_phase(self, index: int) -> None:
        task, stage = self.phases[index]
        was_training = self.net.training
        if stage == "aux":
            self._copy_net(self.net, self.aux_net)
            self.on_auxiliary_trained(task)
            self._copy_net(self.old_net, self.net)  # the main network restarts from θ_{t−1}; aux training never touched it
        else:
            self.on_task_trained(task)
            if self.uses_exemplars():
                self._update_exemplars(task)
            if hasattr(self, "old_net"):
                self._copy_net(self.net, self.old_net)
            self._test_row(task)
        self.phases_finalized.fill_(index + 1)
        self.train(was_training)

    def on_task_trained(self, task: int) -> None:
        """Hook after task ``task``'s main phase, before the snapshot of θ_old (EWC's Fisher)."""

    def on_auxiliary_trained(self, task: int) -> None:
        """Hook after ANCL's auxiliary phase of ``task``, while ``self.net`` still holds the auxiliary weights."""

    def _datamodule(self) -> Any:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "task_set"):
            raise RuntimeError(f"{type(self).__name__} needs a class-incremental datamodule "
                               "(datamodules.continual.ClassIncrementalDataModule)")
        return datamodule

    def task_train_loader(self, indices: torch.Tensor, batch_size: Optional[int] = None,
                          shard: bool = True) -> DataLoader:
        """Training-pool items ``indices`` without augmentation (for the Fisher and herding), this rank's share
        (items ``r, r + w, ...``) when ``shard``."""
        datamodule = self._datamodule()
        indices = indices.tolist()
        if shard and self.trainer.world_size > 1:
            indices = indices[self.trainer.global_rank:: self.trainer.world_size]
        return DataLoader(Subset(datamodule.train_pool_plain, indices),
                          batch_size=batch_size or datamodule.batch_size, shuffle=False,
                          num_workers=datamodule.num_workers)

    @torch.no_grad()
    def _update_exemplars(self, task: int) -> None:
        """Re-select the memory from the current task's training items and the old memory (FACIL's
        ``collect_exemplars``): ``exemplars_per_class``, or ``exemplar_budget // seen classes`` per class. Every rank
        computes on all candidates; rank 0's choice is broadcast so that the ranks cannot drift apart."""
        datamodule = self._datamodule()
        candidates = torch.cat([datamodule.train_indices([task]), self.exemplar_indices]).unique()
        seen_classes = self.task_offsets[task] + self.task_classes[task]
        per_class = self.hparams.exemplars_per_class or self.hparams.exemplar_budget // seen_classes
        labels = datamodule.train_pool_labels[candidates]
        if self.hparams.exemplar_selection == "herding":
            self.net.eval()
            features = torch.cat([self.net.features(batch[0].to(self.device)).float().cpu()
                                  for batch in self.task_train_loader(candidates, shard=False)])
            chosen = herding_selection(features, labels, per_class)
        else:
            generator = torch.Generator().manual_seed(self.hparams.seed * 1000 + task)
            chosen = random_selection(labels, per_class, generator)
        selected = candidates[chosen]
        self.exemplar_indices = self.trainer.strategy.broadcast(selected, src=0).cpu()

    @torch.no_grad()
    def _test_row(self, task: int) -> None:
        """Test every task ``u ≤ task`` on its test split: row ``task`` of both accuracy matrices, then log."""
        datamodule = self._datamodule()
        self.net.eval()
        self.row_accuracy.reset()
        # the run's precision (autocast under *-mixed), as in `zoo test`, so that the row and a test of the same
        # weights agree
        with self.trainer.precision_plugin.forward_context():
            for u in range(task + 1):
                for batch in datamodule.eval_loader(datamodule.task_set("test", u)):
                    images, labels = batch[0].to(self.device), batch[1].to(self.device)
                    self.row_accuracy.update(self._seen_logits(images, task + 1), labels, u)
        acc_taw, acc_tag, _ = self.row_accuracy.compute()  # sums every rank's counts
        self.row_accuracy.reset()
        self.acc_taw[task, : task + 1] = acc_taw[: task + 1].to(self.acc_taw)
        self.acc_tag[task, : task + 1] = acc_tag[: task + 1].to(self.acc_tag)
        self._log_row(task)

    def accuracy_matrix(self, kind: str) -> torch.Tensor:
        """``acc[t, u]`` (``kind`` ``"tag"`` or ``"taw"``) as float64 on the CPU, NaN where not measured."""
        matrix = getattr(self, f"acc_{kind}").double().cpu()
        return torch.where(matrix < 0, float("nan"), matrix)

    def accuracy_summary(self, task: Optional[int] = None) -> dict[str, float]:
        """Average accuracy, forgetting, BWT and the stability/plasticity pair after ``task`` (default: the last
        learned), task-aware and task-agnostic."""
        task = self.tasks_learned() - 1 if task is None else task
        summary: dict[str, float] = {}
        for kind in ("taw", "tag"):
            matrix = self.accuracy_matrix(kind)[: task + 1, : task + 1]
            summary[f"avg_acc_{kind}"] = float(average_accuracy(matrix)[-1])
            summary[f"forgetting_{kind}"] = float(forgetting(matrix)[-1, :task].mean()) if task else 0.0
            summary[f"bwt_{kind}"] = float(backward_transfer(matrix))
            summary[f"new_task_acc_{kind}"] = float(matrix[task, task])
            summary[f"old_tasks_acc_{kind}"] = float(matrix[task, :task].mean()) if task else float("nan")
        return summary

    def _log_row(self, task: int) -> None:
        metrics = {f"cl/{key}": value for key, value in self.accuracy_summary(task).items()}
        metrics["cl/task"] = float(task)
        for kind in ("taw", "tag"):
            for u in range(task + 1):
                metrics[f"cl/task_{u}/acc_{kind}"] = float(self.accuracy_matrix(kind)[task, u])
        for logger in self.trainer.loggers:
            logger.log_metrics({k: v for k, v in metrics.items() if v == v}, step=self.global_step)
        if not self.trainer.is_global_zero:
            return
        columns = ["after_task", *[f"task_{u}" for u in range(self.num_tasks)]]
        for kind in ("tag", "taw"):
            matrix = self.accuracy_matrix(kind)
            rows = [[t, *[None if v != v else round(float(v), 4) for v in matrix[t]]] for t in range(task + 1)]
            log_table(self.trainer, f"cl/acc_{kind}", columns, rows)
            log_images(self.trainer, f"cl/acc_{kind}_matrix", accuracy_heatmap(matrix)[None],
                       [f"{kind.upper()} accuracy after task {task} (rows: after task t, columns: task u)"],
                       f"cl/acc_{kind}_after_task_{task}.png")

    # ---- checkpoint ----------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["continual"] = {"exemplar_indices": self.exemplar_indices.clone()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("continual") or {}
        self.exemplar_indices = torch.as_tensor(state.get("exemplar_indices", []), dtype=torch.long)
