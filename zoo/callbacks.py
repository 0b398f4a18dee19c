"""Callbacks every zoo run gets: resumable checkpoints, a stop on the first non-finite loss, and fine-tuning.

They hold no model-specific code, so a detector, a GAN pair (manual optimisation), a teacher/student pair and a
memory-bank method all use them unchanged.
"""

from __future__ import annotations

import fnmatch
import logging
import random
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info, rank_zero_only
from torch import nn
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image

from zoo.checkpoint import load_weights

__all__ = [
    "log_images", "ImageLogger", "LearningRateLogger", "LastCheckpoint", "NonFiniteLossError", "NonFiniteLossGuard",
    "FineTuning",
]

log = logging.getLogger(__name__)


def log_images(trainer: "L.Trainer", key: str, images: torch.Tensor, captions: Sequence[str], png_name: str,
               nrow: Optional[int] = None) -> None:
    """Send images ``(B, 3, H, W)`` in [0, 1] to the run's loggers: W&B as a captioned list, TensorBoard as a grid;
    with neither (or no logger) write a PNG grid to ``<default_root_dir>/<png_name>``."""
    nrow = nrow or len(images)
    logged = False
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            arrays = [(x.permute(1, 2, 0).numpy() * 255).round().astype("uint8") for x in images]
            logger.log_image(key=key, images=arrays, caption=list(captions), step=trainer.global_step)
            logged = True
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, make_grid(images, nrow=nrow), trainer.global_step)
            logged = True
    if not logged:
        out = Path(trainer.default_root_dir) / png_name
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(images, out, nrow=nrow)


class ImageLogger(Callback):
    """Base of the callbacks that draw pictures for the dashboard during training (CAM overlays, detections, rank
    lists, translations, API-Net pairs), with the one cadence rule they all follow.

    A picture of epoch ``e`` (0-based) is drawn when ``(e + 1) % every_n_epochs == 0`` or ``e`` is the run's last epoch,
    never during the sanity check (``should_draw``); after every test. Drawing happens on rank 0, in eval mode and
    without gradients, and the model's mode is restored afterwards.

    A subclass implements ``draw(trainer, pl_module, stage)`` (``stage`` is ``"val"`` or ``"test"``) and sends its
    images with ``log_images``; it picks where to draw with the class attributes ``after_validation`` and
    ``after_test``, or calls ``should_draw`` from another hook (the pair logger draws on a training batch).

    Args:
        every_n_epochs: the drawing period in training epochs.
    """

    after_validation: bool = True
    after_test: bool = True

    def __init__(self, every_n_epochs: int = 1) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be ≥ 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs

    def draw(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement draw(trainer, pl_module, stage)")

    @staticmethod
    def is_last_epoch(trainer: "L.Trainer") -> bool:
        """The current epoch is the last one: ``max_epochs`` is reached with it, or ``max_steps`` already is."""
        epochs, steps = trainer.max_epochs, trainer.max_steps
        if epochs is not None and epochs > 0 and trainer.current_epoch >= epochs - 1:
            return True
        return steps is not None and steps > 0 and trainer.global_step >= steps

    def should_draw(self, trainer: "L.Trainer") -> bool:
        """The cadence rule (see the class docstring) for the current training epoch."""
        if trainer.sanity_checking:
            return False
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0 or self.is_last_epoch(trainer)

    @torch.no_grad()
    def draw_in_eval_mode(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        was_training = pl_module.training
        pl_module.eval()
        try:
            self.draw(trainer, pl_module, stage)
        finally:
            pl_module.train(was_training)

    @rank_zero_only
    def on_validation_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if self.after_validation and self.should_draw(trainer):
            self.draw_in_eval_mode(trainer, pl_module, "val")

    @rank_zero_only
    def on_test_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if self.after_test:
            self.draw_in_eval_mode(trainer, pl_module, "test")


class LearningRateLogger(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor``, except that a run without a logger is not an error: it logs nothing."""

    def on_train_start(self, trainer: "L.Trainer", *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: "L.Trainer", *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: "L.Trainer", *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


def _rng_states() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and Python, in types ``torch.load(weights_only=True)``
    reads back (numpy's key array as a tensor)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
            "python": (version, tuple(python_state), gauss)}


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(states["python"])


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``last.ckpt`` current: every ``every_n_train_steps`` steps, at each epoch end and when training ends.

    It is a ``ModelCheckpoint`` so that ``--ckpt_path last`` finds its file. The best-on-metric checkpoint is a
    separate ``ModelCheckpoint``: a monitored one defers step-based saves until validation has run.

    Every checkpoint also carries the process's random-number generators (torch, numpy, Python), restored when a
    single-process run resumes, just before training continues. Together with the position of the training loader
    (``datamodules.base.ResumableDataLoader``), a run that loads its data in the main process (``num_workers: 0``, the
    embedded defaults) then draws the same batches, augmentations and dropout masks as the run that was interrupted,
    in every later epoch too. With worker processes, or under DDP (each rank has its own generators; only the loader
    positions are restored), the rest of the interrupted epoch is still exact, and so are later epochs of every
    seeded sampler; only the plain shuffled loader of one process, whose epochs are seeded from torch's generator as
    ``DataLoader(shuffle=True)`` seeds them, may then draw other permutations.

    A step-based save that falls on an epoch's last batch is left to the save at the epoch's end, after validation,
    so that a resumed run starts the next epoch from where the straight run did.
    """

    def __init__(
        self,
        dirpath: Optional[str] = None,
        every_n_train_steps: int = 500,
        train_time_interval: Optional[timedelta] = None,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=None if train_time_interval else every_n_train_steps,
            train_time_interval=train_time_interval,
        )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed or torch.distributed.get_world_size() == 1:
            state["rng_states"] = _rng_states()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self._rng_states_to_restore = state_dict.pop("rng_states", None)
        super().load_state_dict(state_dict)

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        super().on_train_start(trainer, pl_module)
        # Restored here, after Lightning built the loaders and ran its sanity check, right before the next batch.
        states, self._rng_states_to_restore = getattr(self, "_rng_states_to_restore", None), None
        if states is None or trainer.world_size > 1:
            return
        _set_rng_states(states)
        loaders = CombinedLoader(trainer.train_dataloader).flattened if trainer.train_dataloader is not None else []
        if not any(getattr(loader, "resumes_mid_epoch", False) for loader in loaders):
            # Resuming at an epoch's start (the zoo's loaders say when they resume inside one): the interrupted run
            # would now create the epoch's loader iterators, each drawing its worker base seed from torch's RNG
            # (torch.utils.data's _BaseDataLoaderIter; persistent workers draw nothing after their first epoch).
            # This run created them before the restore: draw again.
            for loader in loaders:
                if isinstance(loader, DataLoader) and not (loader.persistent_workers and loader.num_workers > 0):
                    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _save_last_now(self, trainer: "L.Trainer") -> None:
        if self._should_skip_saving_checkpoint(trainer) or self._last_global_step_saved == trainer.global_step:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._save_last_now(trainer)

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._save_last_now(trainer)


class NonFiniteLossError(FloatingPointError):
    """Raised by ``NonFiniteLossGuard``; the message names the step and the batch."""


class NonFiniteLossGuard(Callback):
    """Stops training at the first NaN/Inf loss, before its backward pass and optimizer step.

    Nothing is written after the bad step, so the newest checkpoint still holds finite weights. The check runs in
    ``on_before_backward``, which Lightning calls for automatic optimisation and for every ``manual_backward``, and is
    reduced over ranks so that under DDP every process stops together instead of hanging in the next all-reduce.
    """

    def __init__(self) -> None:
        self._batch_idx = -1

    def on_train_batch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule", batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: "L.Trainer", pl_module: "L.LightningModule", loss: torch.Tensor) -> None:
        bad_here = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad_here, all=False):
            return
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx})"
        what = f"loss = {loss.detach().float().cpu().tolist()}" if bad_here else "another rank's loss"
        last = [cb.last_model_path for cb in trainer.checkpoint_callbacks if getattr(cb, "last_model_path", "")]
        kept = f" The last checkpoint, {last[0]}, was written before this step and is intact." if last else ""
        raise NonFiniteLossError(
            f"Non-finite {what} at {where}; training stopped before the backward pass.{kept} "
            "Try a lower learning rate, gradient clipping (--trainer.gradient_clip_val 1.0), fp32 instead of fp16, "
            "or look for NaN/Inf values in that batch."
        )


class FineTuning(Callback):
    """Initialise a model from a checkpoint or weights file and freeze parameters by name.

    Args:
        init_from: a Lightning ``.ckpt`` or a ``state_dict`` file (read with ``weights_only=True``). Tensors whose name
            and shape match are copied; a head with another class count is skipped and reported.
        key_map: prefix renames applied to the file's keys first, e.g. ``{"model.": "backbone.body."}``.
        freeze: ``fnmatch`` patterns over parameter names (``"backbone.*"``). Frozen parameters get
            ``requires_grad=False``, and batch-norm layers whose parameters are all frozen stay in eval mode, so
            their running statistics do not drift either. A pattern that matches nothing is an error (a typo).

    Weights are loaded in ``setup("fit")``, before optimizers and DDP exist. When a run resumes (``--ckpt_path``), the
    checkpoint's weights win and ``init_from`` is not read again; freezing is re-applied.
    """

    def __init__(
        self,
        init_from: Optional[str] = None,
        key_map: Optional[dict[str, str]] = None,
        freeze: Optional[list[str]] = None,
    ) -> None:
        self.init_from = init_from
        self.key_map = dict(key_map or {})
        self.freeze = list(freeze or [])
        self._frozen_norms: list[nn.Module] = []

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if self.init_from and not trainer.ckpt_path:
            report = load_weights(pl_module, self.init_from, self.key_map)
            if not report.loaded:
                raise RuntimeError(
                    f"init_from: no tensor of '{self.init_from}' matches the model by name and shape; "
                    f"set finetune.key_map to map its prefixes.\n{report.summary()}"
                )
            rank_zero_info(f"[finetune] {self.init_from}: {report.summary()}")
        if self.freeze:
            self._apply_freeze(pl_module)

    def _apply_freeze(self, model: nn.Module) -> None:
        frozen = 0
        for pattern in self.freeze:
            matches = [p for name, p in model.named_parameters() if fnmatch.fnmatchcase(name, pattern)]
            if not matches:
                names = [n for n, _ in model.named_parameters()][:8]
                raise ValueError(f"freeze: pattern {pattern!r} matches no parameter; names look like {names}")
            for p in matches:
                frozen += p.requires_grad
                p.requires_grad_(False)
        self._frozen_norms = [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and any(True for _ in m.parameters())
            and not any(p.requires_grad for p in m.parameters())
        ]
        rank_zero_info(f"[finetune] froze {frozen} parameter tensors ({len(self._frozen_norms)} batch-norm layers in eval)")

    def on_train_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        # Lightning puts the whole model in train mode at each epoch start; frozen BN must not update its statistics.
        for module in self._frozen_norms:
            module.eval()
