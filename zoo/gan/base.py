"""The training skeleton U-GAT-IT and NICE-GAN share: two domains, two optimisers, one step of each per batch.

A training batch from ``datamodules.gan`` is ``{"A": (images_a, labels_a, index_a), "B": (...)}``, independent
draws from the two domains; labels are ``-1`` unless the dataset ships them for evaluation, and training never reads
them. Validation, test and predict serve ``testA`` (loader 0) and ``testB`` (loader 1); every step returns the real
images and their translation to the other domain, which ``zoo.gan.evaluation.TranslationMetrics`` turns into KID and
content-preservation scores. ``zoo predict`` writes the translations as PNGs (``zoo.gan.predict.TranslationWriter``):
of both test folders, or of a ``predict_dir`` folder, whose items (dicts) say the direction themselves.

Optimisation follows both official codes: Adam (lr 1e-4, betas (0.5, 0.999), weight decay 1e-4) for the generators
and for the discriminators, learning rate constant for the first half of training and then linearly to zero, stepped
once per iteration. Lightning counts one ``global_step`` per optimiser step, so an iteration (a D step and a G step)
advances ``global_step`` by 2: ``trainer.max_steps`` counts optimiser steps, the schedule counts iterations.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import lightning as L
import torch
from torch import nn

from zoo.gan.predict import TranslationWriter
from zoo.schedules import half_then_linear_decay

__all__ = ["UnpairedTranslationModule"]


class UnpairedTranslationModule(L.LightningModule):
    """Manual optimisation of a generator group and a discriminator group; evaluation of both translations.

    Subclasses build their networks and implement ``training_step``, ``translate``, ``generator_parameters``,
    ``discriminator_parameters`` and ``untrained_translator``.

    Args:
        lr: Adam learning rate of both groups.
        betas: Adam betas.
        weight_decay: Adam weight decay (the PyTorch ports added it after UGATIT-pytorch issue #6; TF: L2 1e-4).
        decay_lr: linear decay to zero over the second half of training.
        total_iterations: iterations the schedule spans; ``None``: ``max_epochs × batches per epoch``, or
            ``max_steps // 2`` when ``trainer.max_steps`` is set.
    """

    # Each optimizer's backward pass leaves the other group without gradient: under DDP the zoo CLI turns a plain
    # `strategy: ddp` into DDPStrategy(find_unused_parameters=True) for modules that say so here.
    ddp_find_unused_parameters = True

    def __init__(self, *, lr: float = 1e-4, betas: tuple[float, float] = (0.5, 0.999), weight_decay: float = 1e-4,
                 decay_lr: bool = True, total_iterations: int | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False

    # ---- what a paper provides ------------------------------------------------------------------------------------

    def translate(self, images: torch.Tensor, direction: str) -> torch.Tensor:
        """``direction`` ``"a2b"`` or ``"b2a"``: images in [−1, 1] → translated images in [−1, 1]."""
        raise NotImplementedError(f"{type(self).__name__} must define translate()")

    def generator_parameters(self) -> Iterator[nn.Parameter]:
        raise NotImplementedError(f"{type(self).__name__} must define generator_parameters()")

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        raise NotImplementedError(f"{type(self).__name__} must define discriminator_parameters()")

    def untrained_translator(self, direction: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """A freshly initialised translator of the same architecture (the evaluation's 'untrained' baseline)."""
        raise NotImplementedError(f"{type(self).__name__} must define untrained_translator()")

    # ---- optimisation -------------------------------------------------------------------------------------------

    def _total_iterations(self) -> int:
        if self.hparams.total_iterations:
            return int(self.hparams.total_iterations)
        trainer = self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return max(trainer.max_steps // 2, 1)
        return max(int(trainer.estimated_stepping_batches), 1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        adam = dict(lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        opt_g = torch.optim.Adam(self.generator_parameters(), **adam)
        opt_d = torch.optim.Adam(self.discriminator_parameters(), **adam)
        factor = half_then_linear_decay(self._total_iterations()) if hp.decay_lr else (lambda step: 1.0)
        schedules = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in (opt_g, opt_d)]
        return ([opt_g, opt_d], [{"scheduler": s, "interval": "step"} for s in schedules])

    def step_schedules(self) -> None:
        """Manual optimisation: Lightning does not step the schedules, one step per iteration here."""
        for schedule in self.lr_schedulers():
            schedule.step()

    def log_losses(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=True, prog_bar=name in ("d_loss", "g_loss"))

    # ---- evaluation: loader 0 = testA, loader 1 = testB -------------------------------------------------------

    def _eval_step(self, batch: Any, dataloader_idx: int) -> dict[str, torch.Tensor]:
        images, labels, index = batch
        direction = "a2b" if dataloader_idx == 0 else "b2a"
        return {"real": images, "fake": self.translate(images, direction), "labels": labels, "index": index,
                "direction": direction}

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, dataloader_idx)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        if isinstance(batch, dict):  # a predict_dir (datamodules.gan.DirectedImageFiles): one direction for all
            direction = batch["direction"][0]
            return {"fake": self.translate(batch["image"], direction), "index": batch["index"], "direction": direction}
        return self._eval_step(batch, dataloader_idx)

    def prediction_writer(self) -> TranslationWriter:
        """``zoo predict``'s writer: translated PNGs and ``index.csv`` (``zoo.gan.predict``)."""
        return TranslationWriter()
