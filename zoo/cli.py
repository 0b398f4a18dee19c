"""The ``zoo`` command: a LightningCLI whose ``class_path`` entries are the only registry.

``zoo fit|validate|test|predict -c configs/<family>/<config>.yaml`` chooses any ``LightningModule`` and
``LightningDataModule`` subclass by import path. Every run gets, without writing them:

* a W&B logger in offline mode (no account needed; ``--trainer.logger`` swaps in CSV or TensorBoard),
* ``checkpoint``: the best checkpoint on a monitored metric (default ``val/loss``, min),
* ``last_checkpoint``: ``last.ckpt`` every ``every_n_train_steps`` steps, at each epoch end and at the end,
  written atomically, so ``--ckpt_path last`` resumes a killed run,
* ``finetune``: ``init_from`` a checkpoint or weights file with ``key_map`` and ``freeze`` patterns,
* a stop on the first non-finite loss, a learning-rate monitor, a progress bar, and ``seed_everything: 0``,
* ``trainer.use_distributed_sampler: false``: the zoo's datamodules shard their loaders across DDP ranks themselves
  (``datamodules.base.ZooDataModule``), and refuse DDP with Lightning's sampler on top.

Runs live under ``trainer.default_root_dir`` (default ``runs/<config file name>``), so a second invocation of the
same config finds the first one's ``last.ckpt``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from zoo.callbacks import FineTuning, LearningRateLogger, LastCheckpoint, NonFiniteLossGuard
from zoo.checkpoint import AtomicCheckpointIO

__all__ = ["ZooCLI", "main"]


def _run_name(config_paths: list[Any]) -> str:
    return Path(str(config_paths[-1])).stem if config_paths else "zoo"


class ZooCLI(LightningCLI):
    """LightningCLI with the zoo's defaults; see the module docstring. Takes LightningCLI's arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        defaults = {
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"offline": True, "project": "zoo"},
            },
            "callbacks": [LearningRateLogger()],
            # The zoo's datamodules shard every loader across ranks themselves (datamodules.base).
            "use_distributed_sampler": False,
        }
        defaults.update(kwargs.pop("trainer_defaults", None) or {})
        kwargs["trainer_defaults"] = defaults
        # The CLI's `optimizer:` section replacing a model's fallback `configure_optimizers` is the intended design.
        warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden by.*")
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/loss",
            "checkpoint.mode": "min",
            "checkpoint.save_top_k": 1,
            "checkpoint.filename": "best-epoch={epoch:03d}-step={step:06d}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(FineTuning, "finetune")
        parser.add_lightning_class_args(NonFiniteLossGuard, "nonfinite_guard")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="After `fit`, run `test` on the best checkpoint (the last one if none is monitored).",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        if trainer.get("default_root_dir") is None:
            trainer["default_root_dir"] = os.path.join("runs", _run_name(config.get("config") or []))
        root = trainer["default_root_dir"]
        for key in ("checkpoint", "last_checkpoint"):
            if config[key].get("dirpath") is None:
                config[key]["dirpath"] = os.path.join(root, "checkpoints")
        logger = trainer.get("logger")
        if isinstance(logger, dict) or hasattr(logger, "init_args"):
            init = logger["init_args"]
            if init.get("save_dir") in (None, ".") and "save_dir" in init:
                init["save_dir"] = root

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        if not self._get(self.config_init, "trainer", default={}).get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        if not self.config["fit"].get("test_after_fit"):
            return
        if self.trainer.interrupted or self.trainer.state.status.value != "finished":
            return
        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``zoo`` console script and ``python -m zoo``."""
    os.environ.setdefault("WANDB_SILENT", "true")
    ZooCLI(args=args)


if __name__ == "__main__":
    main(sys.argv[1:])
