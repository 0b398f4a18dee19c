"""Callbacks every zoo run gets: resumable checkpoints, a stop on the first non-finite loss, and fine-tuning.

They hold no model-specific code, so a detector, a GAN pair (manual optimisation), a teacher/student pair and a
memory-bank method all use them unchanged. What each does when a run goes wrong (a signal, a divergence, a misspelt
monitor, a read-only folder) is summed up in the README's "Failure behaviour".
"""

from __future__ import annotations

import fnmatch
import logging
import random
import signal
import tempfile
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info, rank_zero_only
from torch import nn
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image

from zoo.predict import write_csv

from zoo.checkpoint import load_weights, remove_stale_temporaries

__all__ = [
    "log_images", "log_table", "ImageLogger", "EpochLines", "LearningRateLogger", "LastCheckpoint", "BestCheckpoint", "TrainingInterrupted",
    "MonitorKeyError", "NonFiniteLossError", "NonFiniteLossGuard", "non_finite_tensors", "FineTuning",
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


def log_table(trainer: "L.Trainer", key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """A results table: to W&B as a ``wandb.Table`` under ``key`` (when the run logs to W&B), and always as
    ``<default_root_dir>/tables/<key with / as _>.csv``, whose path is returned. Call it on rank 0."""
    rows = [list(row) for row in rows]
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb  # noqa: PLC0415

            logger.experiment.log({key: wandb.Table(columns=list(columns), data=rows),
                                   "trainer/global_step": trainer.global_step})
    return write_csv(Path(trainer.default_root_dir) / "tables" / (key.replace("/", "_") + ".csv"), columns, rows)


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


class EpochLines(ProgressBar):
    """The progress "bar" of a run whose output is not a terminal (a log file, a batch job): one line per training
    epoch with its metrics, e.g. ``epoch 3/15  step 270  train/loss 0.1234  val/acc 0.9911  (12.3 s)``, and nothing
    per step. The CLI uses it instead of Lightning's bar when stdout is not a TTY."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._started = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        import time  # noqa: PLC0415

        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        import time  # noqa: PLC0415

        if not self._enabled or not trainer.is_global_zero:
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items()
                   if k != "v_num" and not k.endswith("_step")}
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(metrics.items()))
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        print(f"epoch {trainer.current_epoch + 1}{total}  step {trainer.global_step}  {shown}  "
              f"({time.perf_counter() - self._started:.1f} s)", flush=True)


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


class TrainingInterrupted(SystemExit):
    """Raised after a stop signal once ``last.ckpt`` is saved; its exit status is the shell's ``128 + signal``
    (143 for SIGTERM, 130 for SIGINT), so a scheduler or a script sees that the run did not finish."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message

    def __str__(self) -> str:
        return self.message


def _check_writable(folder: str) -> Optional[str]:
    """Why checkpoints cannot be written to ``folder`` (a local path), or ``None`` when they can."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        return f"the checkpoint folder '{folder}' is not writable ({err.strerror or err}); set --last_checkpoint.dirpath"
    return None


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``last.ckpt`` current: every ``every_n_train_steps`` steps, at each epoch end, when training ends, and
    when the run is told to stop (SIGTERM from a scheduler, Ctrl-C).

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

    Stop signals. During training, SIGTERM and the first SIGINT only raise a flag: the step in progress finishes, then
    ``last.ckpt`` is written at that step (on an epoch's last batch, after the epoch's validation) and the run exits
    with ``TrainingInterrupted`` (status 143 or 130), never 0. Under DDP the ranks agree on the step with one
    all-reduce of a flag per step, so a signal that reaches only one process stops all of them at the same batch. A
    second SIGINT interrupts at once, without saving. Lightning's own SIGTERM handling (stop at the batch's end, save
    nothing, exit 0) is replaced while training runs and restored afterwards.

    At the start of ``fit`` the folder is checked for writability (an error before the first step instead of at the
    first save), and temporary files left by a writer killed mid-save are removed
    (``zoo.checkpoint.remove_stale_temporaries``).
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
            enable_version_counter=False,  # always `last.ckpt`, never a `last-v1.ckpt` beside an older run's file
        )
        self._stop_signal: Optional[int] = None
        self._previous_handlers: dict[int, Any] = {}

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not self.dirpath or type(get_filesystem(self.dirpath)).__name__ != "LocalFileSystem":
            return
        problem = None
        if trainer.is_global_zero:
            problem = _check_writable(self.dirpath)
            if problem is None:
                for path in remove_stale_temporaries(self.dirpath):
                    rank_zero_info(f"[checkpoint] removed {path}, left by a save that was killed mid-write")
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise PermissionError(problem)

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
        self._install_signal_handlers(trainer)
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
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the epoch-end save (after validation) covers this step, and so does a stop signal
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._stop_if_signalled(trainer)

    def _save_last_now(self, trainer: "L.Trainer") -> None:
        if self._should_skip_saving_checkpoint(trainer) or self._last_global_step_saved == trainer.global_step:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._save_last_now(trainer)
        self._stop_if_signalled(trainer)

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._restore_signal_handlers()
        self._save_last_now(trainer)

    def on_exception(self, trainer: "L.Trainer", pl_module: "L.LightningModule", exception: BaseException) -> None:
        self._restore_signal_handlers()

    def teardown(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        self._restore_signal_handlers()

    # -- stop signals ----------------------------------------------------------------------------------------------

    def _install_signal_handlers(self, trainer: "L.Trainer") -> None:
        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread() or self._previous_handlers:
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
            first = self._stop_signal is None
            self._stop_signal = signum
            if first:
                name = signal.Signals(signum).name
                log.warning(f"[checkpoint] {name} received: finishing this step, then saving last.ckpt "
                            "(press Ctrl-C again to stop at once without saving)")
                launcher = trainer.strategy.launcher
                if launcher is not None and hasattr(launcher, "kill"):
                    launcher.kill(signum)  # DDP processes that Lightning started: pass the signal on, as it does

        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, request_stop)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if handler is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signum, handler)
        self._previous_handlers = {}

    def _stop_if_signalled(self, trainer: "L.Trainer") -> None:
        signum = self._stop_signal or 0
        if trainer.world_size > 1:
            mine = torch.tensor(signum, device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(mine, reduce_op="max"))
        if not signum:
            return
        self._save_last_now(trainer)
        name = signal.Signals(signum).name
        message = (f"{name}: training stopped after global step {trainer.global_step}; {self.last_model_path} holds "
                   "that step. Continue with the same command and --ckpt_path last.")
        if trainer.is_global_zero:
            log.warning(message)
        raise TrainingInterrupted(signum, message)


class MonitorKeyError(KeyError):
    """Raised by ``BestCheckpoint`` when its monitored key is never logged; the message lists the logged keys."""

    def __str__(self) -> str:
        return str(self.args[0])


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (the CLI's ``checkpoint``: best on a monitored metric), failing early and
    without losing work when the monitored key is never logged (a typo such as ``val/accuracy``).

    Lightning finds such a key only at the first save after a validation, an epoch into training, with nothing
    saved. Here a validation key (``val...``) is checked when validation metrics first exist, at the sanity check
    before the first training step, provided the model logged any validation metric there. Any other missing key
    still fails where Lightning finds it, but only after ``last.ckpt`` is written for the step.
    """

    @property
    def state_key(self) -> str:
        # The key of Lightning's ModelCheckpoint, which the CLI used before: a run checkpointed then resumes its best
        # score instead of starting the ranking afresh.
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__):]

    def _missing_monitor(self, trainer: "L.Trainer", logged: Sequence[str]) -> MonitorKeyError:
        keys = ", ".join(sorted(k for k in logged if k not in ("epoch", "step"))) or "none"
        return MonitorKeyError(
            f"checkpoint.monitor={self.monitor!r} is not a logged metric. Logged: {keys}. "
            f"Set --checkpoint.monitor to one of them (or null to keep only last.ckpt)."
        )

    def on_validation_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if trainer.sanity_checking and self.monitor and self.monitor.startswith("val"):
            logged = list(trainer.callback_metrics)
            if any(k.startswith("val") for k in logged) and self.monitor not in logged:
                raise self._missing_monitor(trainer, logged)
        super().on_validation_end(trainer, pl_module)

    def _save_topk_checkpoint(self, trainer: "L.Trainer", monitor_candidates: dict[str, torch.Tensor]) -> None:
        if (self.save_top_k != 0 and self.monitor is not None and self.monitor not in monitor_candidates
                and trainer.fit_loop.epoch_loop.val_loop._has_run):
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, LastCheckpoint):
                    callback._save_last_now(trainer)
            raise self._missing_monitor(trainer, list(monitor_candidates))
        super()._save_topk_checkpoint(trainer, monitor_candidates)


class NonFiniteLossError(FloatingPointError):
    """Raised by ``NonFiniteLossGuard``; the message names the step and the batch, or the non-finite tensors."""


def non_finite_tensors(checkpoint: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a Lightning checkpoint dict that hold NaN or Inf: the ``state_dict``
    (parameters and buffers: EMA teachers, memory banks) and every optimizer's state."""
    named: list[tuple[str, torch.Tensor]] = [
        (f"state_dict.{k}", v) for k, v in checkpoint.get("state_dict", {}).items()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    ]
    for i, optimizer_state in enumerate(checkpoint.get("optimizer_states", [])):
        for param_id, slots in optimizer_state.get("state", {}).items():
            named += [(f"optimizer_states[{i}].state[{param_id}].{k}", v) for k, v in slots.items()
                      if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in named]).cpu()  # one device sync, not one per tensor
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


class NonFiniteLossGuard(Callback):
    """Stops training at the first NaN/Inf loss, before its backward pass and optimizer step, and never lets a
    checkpoint with non-finite weights or optimizer state be written.

    A finite loss can still give a non-finite update (a learning rate that overshoots in one step); the loss of the
    next step shows it, but a step save may fall in between. So every checkpoint is checked in
    ``on_save_checkpoint``, before any file is written: non-finite parameters, buffers or optimizer state stop the
    run there with the tensors named, and the previous checkpoint stays the newest. The loss check runs in
    ``on_before_backward``, which Lightning calls for automatic optimisation and for every ``manual_backward``, and is
    reduced over ranks so that under DDP every process stops together instead of hanging in the next all-reduce.
    """

    def __init__(self) -> None:
        self._batch_idx = -1

    def on_train_batch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule", batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    @staticmethod
    def _last_good(trainer: "L.Trainer") -> str:
        saves = [(c._last_global_step_saved, c.last_model_path) for c in trainer.checkpoint_callbacks
                 if isinstance(c, LastCheckpoint) and c._last_global_step_saved > 0 and c.last_model_path]
        if saves:
            step, path = max(saves)
            return (f" The last checkpoint, {path} (global step {step}), holds finite weights: every checkpoint is "
                    "checked before it is written.")
        if trainer.ckpt_path:
            return f" Nothing was saved in this run; {trainer.ckpt_path}, which it resumed from, is unchanged."
        return " No checkpoint was written."

    def on_before_backward(self, trainer: "L.Trainer", pl_module: "L.LightningModule", loss: torch.Tensor) -> None:
        bad_here = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad_here, all=False):
            return
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx})"
        what = f"loss = {loss.detach().float().cpu().tolist()}" if bad_here else "another rank's loss"
        raise NonFiniteLossError(
            f"Non-finite {what} at {where}; training stopped before the backward pass.{self._last_good(trainer)} "
            "Try a lower learning rate, gradient clipping (--trainer.gradient_clip_val 1.0), fp32 instead of fp16, "
            "or look for NaN/Inf values in that batch."
        )

    def on_save_checkpoint(self, trainer: "L.Trainer", pl_module: "L.LightningModule", checkpoint: dict[str, Any]) -> None:
        bad = non_finite_tensors(checkpoint)
        if not bad:
            return
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteLossError(
            f"Non-finite values after global step {trainer.global_step} (epoch {trainer.current_epoch}) in {len(bad)} "
            f"tensors: {shown}. An update diverged although its loss was finite; this checkpoint was not written."
            f"{self._last_good(trainer)} Try a lower learning rate or gradient clipping (--trainer.gradient_clip_val 1.0)."
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
