"""The ``zoo`` command: a LightningCLI whose ``class_path`` entries are the only registry.

``zoo fit|validate|test|predict -c configs/<family>/<config>.yaml`` chooses any ``LightningModule`` and
``LightningDataModule`` subclass by import path. Every run gets, without writing them:

* a W&B logger in offline mode (no account needed; ``--trainer.logger`` swaps in CSV or TensorBoard),
* ``checkpoint``: the best checkpoint on a monitored metric (default ``val/loss``, min); a monitored key that is
  never logged is an error at the sanity check, before training,
* ``last_checkpoint``: ``last.ckpt`` every ``every_n_train_steps`` steps, at each epoch end, at the end and on
  SIGTERM/Ctrl-C, written atomically, so ``--ckpt_path last`` resumes a stopped or killed run,
* ``finetune``: ``init_from`` a checkpoint or weights file with ``key_map`` and ``freeze`` patterns,
* a stop on the first non-finite loss, and no checkpoint with non-finite weights, a learning-rate monitor, a progress
  bar, and ``seed_everything: 0``,
* ``trainer.use_distributed_sampler: false``: the zoo's datamodules shard their loaders across DDP ranks themselves
  (``datamodules.base.ZooDataModule``), and refuse DDP with Lightning's sampler on top.

Runs live under ``trainer.default_root_dir`` (default ``runs/<config file name>``), so a second invocation of the
same config finds the first one's ``last.ckpt``.

``--ckpt_path`` (Lightning's checkpoint-hyperparameter parsing, guarded):

* the checkpoint's model class must be the config's: another class is an error naming both;
* the checkpoint's model arguments are the base that the config files and then the command line override, so an
  explicit setting always wins ("last one wins") and an unset one comes from the checkpoint;
* ``last`` means ``<checkpoint folder>/last.ckpt``; when there is none, ``test``/``validate``/``predict`` stop with
  an error and ``fit`` says in one line that it starts from scratch.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.exceptions import SIGTERMException

from zoo.callbacks import BestCheckpoint, FineTuning, LearningRateLogger, LastCheckpoint, NonFiniteLossGuard
from zoo.checkpoint import AtomicCheckpointIO

__all__ = ["ZooCLI", "ZooCLIError", "main"]


class ZooCLIError(ValueError):
    """A command that cannot run as given; ``main`` prints the message in one line and exits with status 2."""


def _run_name(config_paths: list[Any]) -> str:
    return Path(str(config_paths[-1])).stem if config_paths else "zoo"


def _run_root(config: Namespace) -> str:
    root = config["trainer"].get("default_root_dir")
    return root if root is not None else os.path.join("runs", _run_name(config.get("config") or []))


def _checkpoint_dir(config: Namespace) -> str:
    return config["last_checkpoint"].get("dirpath") or os.path.join(_run_root(config), "checkpoints")


def _config_files(args: list[str]) -> list[str]:
    """The values of ``-c``/``--config`` in a command line."""
    files = []
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _check_yaml(path: str) -> None:
    """Parse a config file up front, so that a YAML error names the file (jsonargparse says ``<unicode string>``)."""
    if not Path(path).is_file():
        return  # jsonargparse reports a missing file itself
    try:
        yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(p) for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p) or str(err)
        raise ZooCLIError(f"{path}{where} is not valid YAML: {what}") from None


def _class_of(class_path: str) -> Any:
    from jsonargparse.typing import import_object  # noqa: PLC0415 - jsonargparse's own class_path resolution

    try:
        return import_object(class_path)
    except Exception:  # noqa: BLE001 - only used to compare two paths
        return class_path


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
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")
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

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._command_line = None
        if not isinstance(args, (dict, Namespace)):
            self._command_line = list(sys.argv[1:] if args is None else args)
            for path in _config_files(self._command_line):
                _check_yaml(path)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = self._resolve_last(subcommand, config)
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = dict(torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        ckpt_class = hparams.pop("_class_path", None)
        model = config.get("model")
        config_class = model.get("class_path") if isinstance(model, Namespace) else None
        if ckpt_class and config_class and _class_of(ckpt_class) is not _class_of(config_class):
            raise ZooCLIError(
                f"--ckpt_path {ckpt_path} holds a {ckpt_class}, but the config's model is a {config_class}. "
                "Use that model's config, or a checkpoint of this model."
            )
        if not (ckpt_class and hparams and self._command_line is not None):
            return
        # The checkpoint's arguments go first, as if they were the first config file: everything the user wrote
        # (config files, then the command line) overrides them, and what they leave unset comes from the checkpoint.
        base = json.dumps({"class_path": ckpt_class, "init_args": hparams}, default=str)
        at = self._command_line.index(subcommand) + 1
        try:
            self.config = self.parser.parse_args([*self._command_line[:at], f"--model={base}", *self._command_line[at:]])
        except SystemExit:
            sys.stderr.write(f"Parsing the model arguments saved in {ckpt_path} failed (see above).\n")
            raise
        self.config[subcommand]["ckpt_path"] = ckpt_path  # `last`, resolved

    def _resolve_last(self, subcommand: str, config: Namespace) -> Optional[str]:
        """``--ckpt_path last``: the run's ``last.ckpt``; without one an error, or a fresh start for ``fit``."""
        folder = _checkpoint_dir(config)
        last = os.path.join(folder, "last.ckpt")
        if os.path.isfile(last):
            config["ckpt_path"] = last
            return last
        if subcommand != "fit":
            raise ZooCLIError(f"--ckpt_path last: there is no {last} to {subcommand}. Train first (zoo fit with the "
                              "same config), or pass --ckpt_path <file>.")
        print(f"[zoo] --ckpt_path last: no {last} yet; starting a new run.", file=sys.stderr)
        config["ckpt_path"] = None
        return None

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        trainer["default_root_dir"] = root = _run_root(config)
        for key in ("checkpoint", "last_checkpoint"):
            if config[key].get("dirpath") is None:
                config[key]["dirpath"] = os.path.join(root, "checkpoints")
        logger = trainer.get("logger")
        if isinstance(logger, dict) or hasattr(logger, "init_args"):
            init = logger["init_args"]
            if init.get("save_dir") in (None, ".") and "save_dir" in init:
                init["save_dir"] = root

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        plugins = trainer_config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            # A precision or environment plugin must not turn the atomic checkpoint writer off.
            kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        strategy = trainer_config.get("strategy")
        unused = f"{strategy}_find_unused_parameters_true" if isinstance(strategy, str) else None
        if unused in StrategyRegistry and getattr(self.model, "ddp_find_unused_parameters", False):
            # Modules with several optimizers (GANs, teacher/student) leave parameters without gradient in each
            # backward pass; DDP must be told so, or the README's `--trainer.strategy ddp` fails at the first step.
            # Lightning registers the variant of every DDP strategy name (ddp, ddp_spawn, ddp_fork, ddp_notebook).
            print(f"[zoo] {type(self.model).__name__} trains with several optimizers: strategy {strategy!r} runs "
                  f"as {unused!r}", file=sys.stderr)
            kwargs.setdefault("strategy", unused)
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
    try:
        ZooCLI(args=args)
    except ZooCLIError as err:
        print(f"zoo: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:
        # Outside training (test, validate, predict) Lightning's SIGTERM handling stops the loop with a SystemExit
        # of status 0; nothing is left to save, but the run did not finish.
        print("zoo: stopped by SIGTERM before the end", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None


if __name__ == "__main__":
    main(sys.argv[1:])
