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

Every ``fit`` gets its own run folder ``<trainer.default_root_dir>/version_<N>/`` (default root
``runs/<config file name>``; ``zoo.runs`` has the layout): ``config.yaml``, ``checkpoints/``, ``wandb/``, ``tables/``,
``predictions/``. ``test``/``validate``/``predict`` work in the folder of the checkpoint they load and write their own
``<command>_config.yaml`` there; ``predict`` makes no W&B run. The W&B run is named ``<config>/version_<N>``, grouped by
family and tagged with the model and data classes, and holds the whole resolved config; at the end the run folder
and the ``wandb sync`` command are printed. ``-c`` takes a config's path or its name (``-c gfl_digits``), ``--model``
and ``--data`` take a zoo class's short name, ``zoo list`` prints every config, and a wrong key is a short error.

Console: one rounded results table per evaluation (``acc ± ci95`` where a CI is logged), and one line per epoch
instead of a progress bar when the output is not a terminal. ``lr_scheduler.init_args.T_max`` follows
``--trainer.max_epochs`` given on the command line unless ``T_max`` is given there too.

``--ckpt_path`` (Lightning's checkpoint-hyperparameter parsing, guarded):

* the checkpoint's model class must be the config's: another class is an error naming both;
* the checkpoint's model arguments are the base that the config files and then the command line override, so an
  explicit setting always wins ("last one wins") and an unset one comes from the checkpoint;
* ``last`` means ``<checkpoint folder>/last.ckpt``; when there is none, ``test``/``validate``/``predict`` stop with
  an error and ``fit`` says in one line that it starts from scratch.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import json
import logging
import os
import pkgutil
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.exceptions import SIGTERMException

from zoo import runs
from zoo.callbacks import (BestCheckpoint, EpochLines, FineTuning, LearningRateLogger, LastCheckpoint,
                           NonFiniteLossGuard)
from zoo.checkpoint import AtomicCheckpointIO

__all__ = ["ZooCLI", "ZooCLIError", "main"]


class ZooCLIError(ValueError):
    """A command that cannot run as given; ``main`` prints the message in one line and exits with status 2."""


#: the one-line description ``zoo --help`` starts with
DESCRIPTION = ("zoo: a PyTorch Lightning model zoo for computer vision. `zoo list [family]` prints every config with "
               "its model, data and measured result; `zoo fit -c <config path or name>` trains one.")


def _run_root(config: Namespace) -> str:
    """The run root: ``trainer.default_root_dir`` (set by the parser's default to ``runs/<config name>``)."""
    root = config["trainer"].get("default_root_dir")
    return str(root) if root is not None else str(runs.run_root_of_config(config.get("config") or []))


def _config_files(args: list[str]) -> list[str]:
    """The values of ``-c``/``--config`` in a command line."""
    files = []
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _resolve_config_names(args: list[str]) -> list[str]:
    """``-c gfl_digits`` → ``-c configs/detection/gfl_digits.yaml``: a ``-c`` value that is no file is looked up by
    name (``zoo.runs.find_config``)."""
    out = list(args)
    for i, arg in enumerate(out):
        value, prefix = None, ""
        if arg in ("-c", "--config") and i + 1 < len(out):
            value, i = out[i + 1], i + 1
        elif arg.startswith("--config="):
            value, prefix = arg.split("=", 1)[1], "--config="
        if value is None or Path(value).is_file() or value.lstrip().startswith("{"):
            continue
        try:
            out[i] = prefix + str(runs.find_config(value))
        except FileNotFoundError as err:
            raise ZooCLIError(str(err)) from None
    return out


def import_zoo_classes() -> None:
    """Import every module of ``zoo`` and ``datamodules``, so that jsonargparse knows every zoo class by its short name
    (``--model ProtoNet``) and ``--help`` lists them. Done only when a command line needs it (a few seconds)."""
    import datamodules  # noqa: PLC0415
    import zoo  # noqa: PLC0415

    for package in (zoo, datamodules):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if module.name.endswith(("__main__", ".cli")):
                continue
            try:
                importlib.import_module(module.name)
            except ImportError:  # an optional dependency of one module must not break the CLI
                continue


def _needs_all_classes(args: list[str]) -> bool:
    for i, arg in enumerate(args):
        if arg in ("-h", "--help") or arg.endswith(".help") or arg.startswith(("--model.help", "--data.help")):
            return True
        name = None
        if arg in ("--model", "--data") and i + 1 < len(args):
            name = args[i + 1]
        elif arg.startswith(("--model=", "--data=")):
            name = arg.split("=", 1)[1]
        if name and "." not in name and not name.lstrip().startswith("{"):
            return True
    return False


def _family(config: Namespace) -> str:
    """The family of a run: ``configs/<family>/`` of its config file, else ``zoo.<family>.`` of its model class."""
    for path in reversed(config.get("config") or []):
        parent = Path(str(path)).parent
        if parent.parent.name == "configs":
            return parent.name
    model = config.get("model")
    class_path = str(model.get("class_path", "")) if isinstance(model, Namespace) else ""
    parts = class_path.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "zoo" else "zoo"


def _short_class(section: Any) -> Optional[str]:
    class_path = section.get("class_path") if isinstance(section, Namespace) else None
    return str(class_path).rsplit(".", 1)[-1] if class_path else None


_UNKNOWN_KEY = [
    re.compile(r"""Option '([^']+)' is not accepted"""),
    re.compile(r"""Key ['"]([^'"]+)['"] is not expected"""),
    re.compile(r"""No action for key ['"]([^'"]+)['"]"""),
]


def short_parse_error(message: str, config: Optional[Namespace] = None) -> str:
    """jsonargparse's error (often 10+ lines: every Union subtype it tried) cut to what matters: the unknown key, the
    class it belongs to and the closest accepted names; any other error as its first lines."""
    section = re.search(r'Parser key "([^"]+)"', message)
    class_path = re.search(r"given class_path '([^']+)'", message)
    for pattern in _UNKNOWN_KEY:
        found = pattern.search(message)
        if not found:
            continue
        key = found.group(1)
        where = f"{section.group(1)}: " if section else ""
        owner = f" of {class_path.group(1)}" if class_path else ""
        accepted: list[str] = []
        if class_path:
            try:
                accepted = list(inspect.signature(_class_of(class_path.group(1))).parameters)
            except (TypeError, ValueError):
                accepted = []
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], accepted, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = f"\nAccepted: {', '.join(a for a in accepted if a not in ('args', 'kwargs'))}" if accepted else ""
        return f"{where}unknown key '{key}'{owner}.{hint}{listing}"
    unrecognized = re.search(r"unrecognized arguments: (.+)", message)
    if unrecognized:
        return (f"unknown option {unrecognized.group(1).strip()}. `zoo <command> -c <config> --print_config` shows "
                "every key.")
    keys = re.findall(r'Parser key "([^"]+)"', message)
    expected = re.search(r"Expected a <class '([^']+)'>\. Got value: (.+)", message)
    if keys and expected:
        inner = ".init_args." if class_path else "."
        return f"{inner.join(keys)}: expected {expected.group(1)}, got {expected.group(2).strip()!r}"
    subtypes = re.search(r"Subtypes: \[(.+)\]", message)
    given = re.search(r"Given value: (.+)", message)
    if keys and subtypes and given:
        types = ", ".join(re.findall(r"<class '([^']+)'>", subtypes.group(1)))
        return f"{'.'.join(keys)}: expected {types}, got {given.group(1).strip()!r}"
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return "\n".join(lines[:4]) + ("\n(...)" if len(lines) > 4 else "")


def _format_value(value: float, digits: Optional[int] = None) -> str:
    if digits is None:
        digits = 4 if abs(value) < 10 else 2
    return f"{value:.{digits}f}"


def results_table(results: list[dict[str, float]] | dict[str, float], title: str) -> str:
    """One table of evaluation results: the metrics of every dataloader merged (a metric logged without a dataloader
    suffix appears once), rounded, and ``x ± ci`` where a ``ci95`` partner of ``x`` (same name with ``acc``) exists."""
    merged: dict[str, float] = {}
    for part in results if isinstance(results, list) else [results]:
        for key, value in part.items():
            value = float(value.item() if isinstance(value, torch.Tensor) else value)
            base = re.sub(r"/dataloader_idx_\d+$", "", key)
            if base in merged and merged[base] == value:
                continue
            merged[key if base in merged else base] = value
    shown: list[tuple[str, str]] = []
    paired = set()
    for key in merged:
        if "ci95" in key and key.replace("ci95", "acc") in merged:
            paired.add(key)
    for key in sorted(merged):
        if key in paired:
            continue
        partner = key.replace("acc", "ci95", 1) if "acc" in key else None
        if partner in paired:
            digits = 2 if abs(merged[key]) >= 1 else 4
            shown.append((key, f"{_format_value(merged[key], digits)} ± {_format_value(merged[partner], digits)}"))
        else:
            shown.append((key, _format_value(merged[key])))
    width = max([len(k) for k, _ in shown] + [6])
    lines = [title, f"  {'metric':<{width}}  value", *(f"  {k:<{width}}  {v}" for k, v in shown)]
    return "\n".join(lines)


class ZooSaveConfig(SaveConfigCallback):
    """Lightning's config writer, writing the config as the user gave it (the run root, not the run folder, so a
    copied ``config.yaml`` starts a new run) and sending the whole resolved config to W&B."""

    def __init__(self, parser: LightningArgumentParser, config: Namespace, *args: Any,
                 user_config: Optional[Namespace] = None, run_dir: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(parser, user_config if user_config is not None else config, *args, **kwargs)
        self.resolved_config, self.run_dir = config, run_dir

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers:
            return
        resolved = yaml.safe_load(self.parser.dump(self.resolved_config, skip_none=False, skip_validation=True))
        resolved["run_dir"] = self.run_dir
        for logger in wandb_loggers:
            logger.experiment.config.update(resolved, allow_val_change=True)


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
        self.run_dir: Optional[Path] = None
        kwargs.setdefault("save_config_callback", ZooSaveConfig)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        defaults = {
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"offline": True, "project": "zoo", "log_model": True},
            },
            "callbacks": [LearningRateLogger()],
            # The zoo's datamodules shard every loader across ranks themselves (datamodules.base).
            "use_distributed_sampler": False,
        }
        defaults.update(kwargs.pop("trainer_defaults", None) or {})
        kwargs["trainer_defaults"] = defaults
        # The CLI's `optimizer:` section replacing a model's fallback `configure_optimizers` is the intended design.
        warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden by.*")
        filter_upstream_warnings()
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # Errors come back as exceptions, so that `main` prints a short message instead of the whole usage.
        kwargs.setdefault("exit_on_error", False)
        kwargs.setdefault("description", DESCRIPTION)
        return super().init_parser(**kwargs)

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

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            # The prediction writers keep what they write; Lightning need not hold every output in memory.
            parser.set_defaults({"return_predictions": False})
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._command_line = None
        if not isinstance(args, (dict, Namespace)):
            self._command_line = _resolve_config_names(list(sys.argv[1:] if args is None else args))
            args = self._command_line
            files = _config_files(self._command_line)
            for path in files:
                _check_yaml(path)
            if _needs_all_classes(self._command_line):
                import_zoo_classes()
            # `--print_config` and the saved config show the run root the run uses.
            root = str(runs.run_root_of_config(files))
            for subparser in getattr(self, "_subcommand_parsers", {}).values() or [parser]:
                subparser.set_defaults({"trainer.default_root_dir": root})
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ZooCLIError(short_parse_error(str(err))) from None


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
        except ArgumentError as err:
            raise ZooCLIError(f"the model arguments saved in {ckpt_path} do not parse: {short_parse_error(str(err))}"
                              ) from None
        self.config[subcommand]["ckpt_path"] = ckpt_path  # `last`, resolved

    def _resolve_last(self, subcommand: str, config: Namespace) -> Optional[str]:
        """``--ckpt_path last``: the newest run's ``last.ckpt`` (or ``<last_checkpoint.dirpath>/last.ckpt`` when that
        is set); without one an error, or a fresh start for ``fit``."""
        explicit = config["last_checkpoint"].get("dirpath")
        if explicit:
            last = os.path.join(explicit, "last.ckpt")
        else:
            run = runs.latest_run(_run_root(config))
            last = str(run / "checkpoints" / "last.ckpt") if run is not None else os.path.join(
                _run_root(config), "version_<N>", "checkpoints", "last.ckpt")
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
        subcommand = self.subcommand
        config = self.config[subcommand] if subcommand else self.config
        user_config = copy.deepcopy(config)
        trainer = config["trainer"]
        root = _run_root(config)
        self.run_dir = run_dir = self._choose_run_dir(subcommand, config, Path(root), create=subcommand is not None)
        trainer["default_root_dir"] = str(run_dir)
        for key in ("checkpoint", "last_checkpoint"):
            if config[key].get("dirpath") is None:
                config[key]["dirpath"] = str(run_dir / "checkpoints")
        self._keep_integer_limits(config)
        self._link_schedule_length(config)
        self._configure_wandb(subcommand, config, Path(root), run_dir)
        self.save_config_kwargs = {
            **self.save_config_kwargs, "user_config": user_config, "run_dir": str(run_dir),
            "config_filename": "config.yaml" if subcommand in (None, "fit") else f"{subcommand}_config.yaml",
        }

    @staticmethod
    def _choose_run_dir(subcommand: Optional[str], config: Namespace, root: Path, create: bool = True) -> Path:
        """The run folder (``zoo.runs``): a checkpoint's own for a resumed fit and for test/validate/predict, else a
        new ``version_<N>`` (created now unless ``create`` is false: ``run=False`` from Python, where Lightning
        creates it when it first writes)."""
        ckpt = config.get("ckpt_path")
        if ckpt and Path(ckpt).is_file():
            run = runs.run_of_checkpoint(ckpt)
            if run is not None:
                return run
        run = runs.choose_run_dir(root, create=create)
        if not create:
            return run
        os.environ[runs.RUN_DIR_ENV] = str(run)  # the processes Lightning launches for DDP use the same folder
        if subcommand in (None, "fit"):
            runs.mark_latest(run)
        return run

    #: trainer arguments where an int counts batches and a float is a fraction (``1`` batch vs ``1.0`` = all)
    _BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                     "val_check_interval", "overfit_batches")

    def _keep_integer_limits(self, config: Namespace) -> None:
        """``--trainer.limit_val_batches=1`` means one batch, but jsonargparse reads ``Union[int, float]`` as the
        float 1.0, which Lightning takes as 100 %: an integer as written (command line or YAML) stays an int."""
        written: dict[str, Any] = {}
        for path in config.get("config") or []:
            try:
                loaded = yaml.safe_load(Path(str(path)).read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            trainer = loaded.get("trainer") if isinstance(loaded, dict) else None
            written.update({k: v for k, v in (trainer or {}).items() if k in self._BATCH_LIMITS})
        line = self._command_line or []
        for i, arg in enumerate(line):
            for key in self._BATCH_LIMITS:
                if arg == f"--trainer.{key}" and i + 1 < len(line):
                    written[key] = line[i + 1]
                elif arg.startswith(f"--trainer.{key}="):
                    written[key] = arg.split("=", 1)[1]
        self._integer_limits = {}
        for key, value in written.items():
            raw = str(value).strip()
            if not isinstance(value, bool) and re.fullmatch(r"\d+", raw) and config["trainer"].get(key) is not None:
                config["trainer"][key] = self._integer_limits[key] = int(raw)

    def _link_schedule_length(self, config: Namespace) -> None:
        """``T_max`` of a cosine schedule follows ``--trainer.max_epochs`` given on the command line (the config's
        ``T_max`` was written for the config's epochs), unless ``T_max`` is given there as well."""
        scheduler = config.get("lr_scheduler")
        if not isinstance(scheduler, Namespace) or "T_max" not in (scheduler.get("init_args") or {}):
            return
        command_line = " ".join(self._command_line or [])
        epochs = config["trainer"].get("max_epochs")
        if "max_epochs" in command_line and "T_max" not in command_line and epochs and epochs > 0:
            if scheduler["init_args"]["T_max"] != epochs:
                print(f"[zoo] lr_scheduler T_max {scheduler['init_args']['T_max']} -> {epochs}, following "
                      "--trainer.max_epochs", file=sys.stderr)
            scheduler["init_args"]["T_max"] = epochs

    def _configure_wandb(self, subcommand: Optional[str], config: Namespace, root: Path, run_dir: Path) -> None:
        """The W&B run: in the run folder, named ``<config>/<version>[/<command>]``, grouped by family, tagged with
        model and data; checkpoints as artifacts only online; no run at all for ``predict``."""
        trainer = config["trainer"]
        logger = trainer.get("logger")
        if not isinstance(logger, Namespace) or "init_args" not in logger:
            return
        if _class_of(str(logger.get("class_path"))) is not WandbLogger:
            init = logger["init_args"]
            if init.get("save_dir") in (None, ".") and "save_dir" in init:
                init["save_dir"] = str(run_dir)
            return
        if subcommand == "predict":
            trainer["logger"] = False  # prediction logs nothing; a W&B run would stay empty
            return
        init = logger["init_args"]
        if init.get("save_dir") in (None, "."):
            init["save_dir"] = str(run_dir)
        if not init.get("name"):
            name = f"{root.name}/{run_dir.name}"
            init["name"] = name if subcommand in (None, "fit") else f"{name}/{subcommand}"
        if init.get("offline"):
            init["log_model"] = False  # artifacts of every checkpoint would only fill the offline folder
        tags = [t for t in (_family(config), _short_class(config.get("model")), _short_class(config.get("data"))) if t]
        extra = dict(logger.get("dict_kwargs") or {})
        for key, value in (("group", _family(config)), ("job_type", subcommand or "fit"), ("tags", tags)):
            if key in init:  # WandbLogger names them in its signature (newer Lightning) or passes **kwargs on
                if init.get(key) is None:
                    init[key] = value
            else:
                extra.setdefault(key, value)
        if extra:
            logger["dict_kwargs"] = extra

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
        for key, value in getattr(self, "_integer_limits", {}).items():
            kwargs.setdefault(key, value)  # jsonargparse turns them back into floats when it instantiates
        trainer_config = {**trainer_config, **kwargs}
        callbacks = trainer_config.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if (trainer_config.get("enable_progress_bar") is not False and not sys.stdout.isatty()
                and not any(isinstance(cb, ProgressBar) for cb in callbacks)):
            # In a log file a progress bar writes a line per refresh; one line per epoch reads better.
            kwargs["callbacks"] = [*callbacks, EpochLines()]
        trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:
            init = getattr(logger, "_wandb_init", None) if isinstance(logger, WandbLogger) else None
            if isinstance(init, dict) and init.get("anonymous") is None:
                init.pop("anonymous", None)  # W&B warns about the setting even when it is None
        if self.subcommand == "predict":
            self._add_prediction_writer(trainer)
        return trainer

    def _add_prediction_writer(self, trainer: L.Trainer) -> None:
        """``zoo predict`` writes files: the model's family writer (``prediction_writer()``), unless the config names
        a ``BasePredictionWriter`` of its own."""
        if any(isinstance(cb, BasePredictionWriter) for cb in trainer.callbacks):
            return
        make_writer = getattr(self.model, "prediction_writer", None)
        if make_writer is None:
            raise ZooCLIError(f"{type(self.model).__name__} has no prediction writer (prediction_writer()); add a "
                              "BasePredictionWriter under trainer.callbacks")
        trainer.callbacks.append(make_writer())

    # ---- the commands: Lightning's, with one results table instead of Lightning's per-dataloader columns ----------

    def validate(self, **kwargs: Any) -> None:
        self._evaluate("validate", **kwargs)

    def test(self, **kwargs: Any) -> None:
        self._evaluate("test", **kwargs)

    def _evaluate(self, command: str, **kwargs: Any) -> None:
        kwargs["verbose"] = False
        results = getattr(self.trainer, command)(**kwargs)
        self._print_results(results, command, kwargs.get("ckpt_path"))

    def _print_results(self, results: list[dict[str, float]], command: str, ckpt_path: Optional[str]) -> None:
        if not self.trainer.is_global_zero or not results:
            return
        source = f", {ckpt_path}" if ckpt_path else ""
        print(results_table(results, f"{command} results ({self.run_dir}{source})"), flush=True)

    def after_fit(self) -> None:
        if self.config["fit"].get("test_after_fit") and not self.trainer.interrupted \
                and self.trainer.state.status.value == "finished":
            best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
            results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=False)
            self._print_results(results, "test", best or None)
        self._print_run_summary()

    def after_validate(self) -> None:
        self._print_run_summary()

    def after_test(self) -> None:
        self._print_run_summary()

    def after_predict(self) -> None:
        self._print_run_summary()

    def _print_run_summary(self) -> None:
        """Where the run went: its folder, and for W&B the run page or the command that uploads an offline run."""
        if not self.trainer.is_global_zero:
            return
        lines = [f"[zoo] run folder: {self.run_dir}"]
        for logger in self.trainer.loggers:
            run = getattr(logger, "_experiment", None) if isinstance(logger, WandbLogger) else None
            if run is None:
                continue
            if getattr(run, "offline", False) or getattr(getattr(run, "settings", None), "mode", "") == "offline":
                lines.append(f"[zoo] W&B offline run: upload it with `wandb sync {Path(run.dir).parent}`")
            elif getattr(run, "url", None):
                lines.append(f"[zoo] W&B run: {run.url}")
        print("\n".join(lines), flush=True)


def filter_upstream_warnings() -> None:
    """Silence the upstream warnings every run would print that say nothing about the run (each checked to be
    harmless for the zoo's loaders and loggers)."""
    for message in (
        r".*does not have many workers.*",  # the embedded defaults load in the main process on purpose
        r".*The number of training batches .* is smaller than the logging interval.*",
        r".*Checkpoint directory .* exists and is not empty.*",  # run folders are reused on resume by design
        r".*Starting from v1\.9\.0, `tensorboardX` has been removed.*",
        r".*treespec, LeafSpec.*",
        r".*LightningCLI's args parameter is intended.*",  # the zoo passes the command line on after resolving -c
        # networks given as objects are dropped from the hparams (zoo.checkpoint.drop_module_hyperparameters)
        r".*is an instance of `nn.Module` and is already saved during checkpointing.*",
        # frozen networks (EMA teachers, continual learning's previous and auxiliary networks) stay in eval mode
        r".*module\(s\) in eval mode at the start of training.*",
    ):
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvert) for f in logger.filters):
            logger.addFilter(_DropAdvert())


class _DropAdvert(logging.Filter):
    """Lightning's "Tip: try installing litlogger" line, printed on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.getMessage())


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``zoo`` console script and ``python -m zoo``."""
    os.environ.setdefault("WANDB_SILENT", "true")
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["list"]:
        from zoo.catalog import print_catalog  # noqa: PLC0415

        raise SystemExit(print_catalog(argv[1:]))
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
