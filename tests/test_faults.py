"""A diverged, killed or mis-pointed run must never lose work, lie, or silently use the wrong thing.

One test (or a few) per failure: divergence, a checkpoint of another model, stop signals, a missing ``last.ckpt``,
stateful methods saved in step with their weights, a misspelt monitor, an unwritable folder, temporary files of a
killed save, the atomic writer under other plugins, invalid YAML, and DDP for the multi-optimizer modules. The data
loaders' faults (16-bit images, malformed files, pickles carrying code) are in ``test_faults_data.py``.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from conftest import DIGITS, ROOT, quiet_args, run_zoo
from zoo.callbacks import MonitorKeyError, NonFiniteLossError, TrainingInterrupted, non_finite_tensors
from zoo.checkpoint import AtomicCheckpointIO, remove_stale_temporaries
from zoo.cli import ZooCLI, ZooCLIError

MPL = ROOT / "configs" / "semisup" / "mpl_digits.yaml"
FAST = ["--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=0"]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _short_run(root, *extra, config=DIGITS, steps=2):
    """A ``steps``-step digits (or other config) fit that leaves ``<root>/version_0/checkpoints/last.ckpt`` (the first
    run under ``root``)."""
    ZooCLI(args=["fit", *quiet_args(root, f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0",
                                    *extra, config=config)])
    return root / "version_0" / "checkpoints" / "last.ckpt"


# ---- 1. divergence: no checkpoint with non-finite weights ---------------------------------------------------------

@pytest.mark.parametrize("config, lrs", [
    (DIGITS, ["--optimizer.init_args.lr=1e6"]),  # automatic optimisation
    (MPL, ["--model.init_args.teacher_lr=1e6", "--model.init_args.student_lr=1e6"]),  # manual, two optimizers
], ids=["classifier", "mpl"])
def test_a_diverging_learning_rate_never_writes_non_finite_tensors_and_the_message_names_the_kept_file(
        tmp_path, config, lrs):
    args = quiet_args(tmp_path, *lrs, "--last_checkpoint.every_n_train_steps=1", "--trainer.max_steps=60",
                      *FAST, config=config)
    with pytest.raises(NonFiniteLossError) as err:
        ZooCLI(args=["fit", *args])
    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    saved = _load(last)
    assert non_finite_tensors(saved) == [], "a checkpoint with NaN/Inf tensors was written"
    assert f"{last} (global step {saved['global_step']})" in str(err.value)


def test_a_finite_loss_with_a_non_finite_update_stops_before_that_steps_save_and_the_run_resumes(tmp_path):
    model = ["--model.class_path=helpers.NaNUpdateAtStep", "--model.init_args.nan_at_step=5"]
    args = quiet_args(tmp_path, *model, "--last_checkpoint.every_n_train_steps=1", "--trainer.max_steps=20", *FAST)
    with pytest.raises(NonFiniteLossError) as err:
        ZooCLI(args=["fit", *args])
    message = str(err.value)
    assert "after global step 5" in message and "state_dict.backbone." in message and "global step 4)" in message
    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    assert _load(last)["global_step"] == 4 and non_finite_tensors(_load(last)) == []
    # The kept checkpoint trains on (here with the fault switched off).
    resume = quiet_args(tmp_path, *model, "--model.init_args.nan_at_step=-1", "--trainer.max_steps=8", *FAST)
    ZooCLI(args=["fit", *resume, "--ckpt_path=last"])
    assert _load(last)["global_step"] == 8 and non_finite_tensors(_load(last)) == []


def test_non_finite_tensors_names_parameters_buffers_and_optimizer_state():
    checkpoint = {
        "state_dict": {"w": torch.tensor([1.0, float("nan")]), "ema.num_updates": torch.tensor(3),
                       "memory.slots": torch.tensor([float("inf")]), "ok": torch.zeros(2)},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.tensor([float("-inf")])}}}],
    }
    assert non_finite_tensors(checkpoint) == ["state_dict.w", "state_dict.memory.slots",
                                              "optimizer_states[0].state[0].exp_avg"]


# ---- 2. --ckpt_path: the config's class, explicit settings win ----------------------------------------------------

def test_a_checkpoint_of_another_model_class_is_an_error_naming_both(tmp_path):
    ckpt = _short_run(tmp_path / "classifier")
    with pytest.raises(ZooCLIError) as err:
        ZooCLI(args=["test", *quiet_args(tmp_path / "mpl", config=MPL), f"--ckpt_path={ckpt}"])
    assert "ImageClassifier" in str(err.value) and "MetaPseudoLabels" in str(err.value)
    result = run_zoo("test", *quiet_args(tmp_path / "mpl", config=MPL), f"--ckpt_path={ckpt}")
    assert result.returncode == 2 and "zoo: error:" in result.stderr and "Traceback" not in result.stderr


def test_explicit_settings_win_over_the_checkpoints_and_unset_ones_come_from_it(tmp_path):
    ckpt = _short_run(tmp_path / "train", "--model.init_args.dropout=0.3", "--model.init_args.label_smoothing=0.05")
    evaluate = quiet_args(tmp_path / "eval", "--trainer.limit_val_batches=1")
    # label_smoothing is not in the config: it comes from the checkpoint; dropout is (0.2) and wins.
    cli = ZooCLI(args=["validate", *evaluate, f"--ckpt_path={ckpt}"])
    assert cli.model.hparams.label_smoothing == 0.05 and cli.model.hparams.dropout == 0.2
    # The command line wins over both.
    cli = ZooCLI(args=["validate", *evaluate, "--model.init_args.label_smoothing=0.1",
                       "--model.init_args.dropout=0.4", f"--ckpt_path={ckpt}"])
    assert cli.model.hparams.label_smoothing == 0.1 and cli.model.hparams.dropout == 0.4


# ---- 4. stop signals save last.ckpt and exit non-zero -------------------------------------------------------------

@pytest.mark.parametrize("signal_name, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stop_signal_saves_last_ckpt_at_that_step_and_exits_non_zero(tmp_path, signal_name, status):
    args = quiet_args(tmp_path, "--last_checkpoint.every_n_train_steps=1000", "--trainer.max_steps=40", *FAST,
                      f"--trainer.callbacks=[{{class_path: helpers.SignalAtStep, init_args: {{step: 7, "
                      f"signal_name: {signal_name}}}}}]")
    result = run_zoo("fit", *args)
    assert result.returncode == status, result.stderr[-3000:]
    assert "--ckpt_path last" in result.stderr
    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    assert _load(last)["global_step"] == 7
    if signal_name == "SIGINT":
        return  # the resume is the same as after SIGTERM
    resumed = run_zoo("fit", *quiet_args(tmp_path, "--trainer.max_steps=10", *FAST), "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _load(last)["global_step"] == 10


def test_sigterm_during_test_exits_non_zero(tmp_path):
    result = run_zoo("test", *quiet_args(tmp_path, "--trainer.limit_test_batches=5",
                                         "--trainer.callbacks=[{class_path: helpers.SignalAtTestBatch}]"))
    assert result.returncode == 143 and "SIGTERM" in result.stderr, result.stderr[-2000:]


def test_a_signal_in_process_raises_training_interrupted_after_the_save(tmp_path):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    args = quiet_args(tmp_path, "--last_checkpoint.every_n_train_steps=1000", "--trainer.max_steps=40", *FAST,
                      "--trainer.callbacks=[{class_path: helpers.SignalAtStep, init_args: {step: 3}}]")
    with pytest.raises(TrainingInterrupted) as err:
        ZooCLI(args=["fit", *args])
    assert err.value.code == 143 and _load(tmp_path / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back


def test_a_signal_to_one_ddp_rank_stops_both_at_the_same_step(tmp_path):
    args = quiet_args(tmp_path, "--last_checkpoint.every_n_train_steps=1000", "--trainer.max_steps=40", *FAST,
                      "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
                      "--trainer.callbacks=[{class_path: helpers.SignalAtStep, init_args: {step: 4, rank: 1}}]")
    result = run_zoo("fit", *args, timeout=300)
    assert result.returncode != 0 and "SIGTERM: training stopped after global step 4" in result.stderr, \
        result.stderr[-3000:]
    assert _load(tmp_path / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 4


# ---- 5. --ckpt_path last without a checkpoint ---------------------------------------------------------------------

@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
def test_ckpt_path_last_without_a_checkpoint_is_an_error_outside_fit(tmp_path, subcommand):
    with pytest.raises(ZooCLIError, match="no .*last.ckpt"):
        ZooCLI(args=[subcommand, *quiet_args(tmp_path), "--ckpt_path=last"])


def test_ckpt_path_last_without_a_checkpoint_starts_fit_from_scratch_with_a_notice(tmp_path, capsys):
    ZooCLI(args=["fit", *quiet_args(tmp_path, "--trainer.max_steps=1", "--trainer.limit_val_batches=0"),
                 "--ckpt_path=last"])
    assert "starting a new run" in capsys.readouterr().err
    assert _load(tmp_path / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 1


# ---- 6. stateful methods: the saved state is the live state at the save step --------------------------------------

def _ecn_args(tmp_path):
    from datamodules.generated.reid_toypeople import write_synthetic_reid

    write_synthetic_reid(tmp_path / "people")
    return [f"--data.init_args.root={tmp_path / 'people'}", "--model.init_args.embedding_dim=32"]


@pytest.mark.parametrize("name", ["reid/ecn_synthetic", "semisup/mpl_digits", "semisup/uda_digits",
                                  "semisup/entmin_digits", "gan/ugatit_digits"])
def test_a_step_checkpoint_holds_the_state_of_that_step(tmp_path, name):
    """Memory banks, EMA teachers and their counters must be saved with the weights of the same step: the last step
    is saved by the step save (the end-of-training save then has nothing new), so the file must equal the live
    model once training has stopped."""
    extra = _ecn_args(tmp_path) if name.startswith("reid") else []
    steps = 4  # MPL and the GANs count two optimizer steps per batch
    args = quiet_args(tmp_path / "run", *extra, f"--trainer.max_steps={steps}", f"--last_checkpoint.every_n_train_steps={steps}",
                      "--trainer.limit_val_batches=0", config=ROOT / "configs" / f"{name}.yaml")
    cli = ZooCLI(args=["fit", *args])
    saved = _load(tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == steps
    live = cli.model.state_dict()
    assert saved["state_dict"].keys() == live.keys()
    stale = [k for k, v in live.items() if not torch.equal(saved["state_dict"][k], v.cpu())]
    assert stale == []


# ---- 7f / 8 / 9: errors that name the problem, early; checkpoint hygiene ------------------------------------------

def test_invalid_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: x\n  init_args: [1, 2\n")
    result = run_zoo("fit", "-c", str(bad))
    assert result.returncode == 2
    assert str(bad) in result.stderr and "line 4" in result.stderr and "<unicode string>" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 5


def test_a_misspelt_validation_monitor_fails_at_the_sanity_check_before_training(tmp_path):
    args = quiet_args(tmp_path, "--checkpoint.monitor=val/accuracy", "--trainer.limit_val_batches=2",
                      "--trainer.max_steps=5")
    with pytest.raises(MonitorKeyError) as err:
        ZooCLI(args=["fit", *args])
    assert "val/accuracy" in str(err.value) and "val/acc" in str(err.value)
    assert not (tmp_path / "version_0" / "checkpoints" / "last.ckpt").exists()  # no training step was spent


def test_a_missing_monitor_found_after_training_writes_last_ckpt_first(tmp_path):
    args = quiet_args(tmp_path, "--checkpoint.monitor=val/accuracy", "--trainer.limit_val_batches=2",
                      "--trainer.num_sanity_val_steps=0", "--trainer.limit_train_batches=3", "--trainer.max_epochs=2",
                      "--last_checkpoint.every_n_train_steps=1000")
    with pytest.raises(MonitorKeyError, match="val/accuracy"):
        ZooCLI(args=["fit", *args])
    assert _load(tmp_path / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_an_unwritable_checkpoint_folder_fails_before_the_first_step(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a folder below a file cannot be created, even by root
    args = quiet_args(tmp_path, f"--last_checkpoint.dirpath={blocker / 'checkpoints'}", "--trainer.max_steps=5")
    with pytest.raises(PermissionError, match="not writable"):
        ZooCLI(args=["fit", *args])


def test_temporaries_of_a_killed_save_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname().replace(".", "_")
    stale = tmp_path / f".last.ckpt.{host}-{int(dead.stdout)}.k3j_x9ab.tmp"
    live = tmp_path / f".last.ckpt.{host}-{os.getpid()}.q8w2e1rt.tmp"
    other_host = tmp_path / f".last.ckpt.elsewhere-{int(dead.stdout)}.a1b2c3d4.tmp"
    for path in (stale, live, other_host):
        path.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other_host.exists()


def test_a_resumed_fit_removes_the_temporary_file_of_a_save_that_was_killed(tmp_path):
    folder = _short_run(tmp_path, steps=1).parent
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder / f".last.ckpt.{socket.gethostname().replace('.', '_')}-{int(dead.stdout)}.abcdefgh.tmp"
    stale.write_bytes(b"\0" * 1024)
    _short_run(tmp_path, "--ckpt_path=last", steps=2)  # resumes in the same run folder
    assert not stale.exists() and [p.name for p in folder.glob(".*")] == []
    assert not (tmp_path / "version_1").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"x": torch.zeros(1)}, tmp_path / "a.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.ckpt").stat().st_mode & 0o777 == mode


def test_other_trainer_plugins_keep_the_atomic_checkpoint_writer(tmp_path):
    cli = ZooCLI(args=[*quiet_args(tmp_path), "--trainer.plugins=lightning.fabric.plugins.environments.LightningEnvironment"],
                 run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ---- 11. the README's DDP line works for the multi-optimizer modules ----------------------------------------------

@pytest.mark.parametrize("config", [MPL, ROOT / "configs" / "gan" / "ugatit_digits.yaml"], ids=["mpl", "ugatit"])
def test_plain_ddp_strategy_finds_unused_parameters_for_multi_optimizer_modules(tmp_path, config):
    cli = ZooCLI(args=["-c", str(config), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                       "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"], run=False)
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    assert cli.trainer.strategy._ddp_kwargs.get("find_unused_parameters") is True


def test_single_optimizer_modules_keep_plain_ddp(tmp_path):
    cli = ZooCLI(args=[*quiet_args(tmp_path), "--trainer.strategy=ddp", "--trainer.devices=2",
                       "--trainer.accelerator=cpu"], run=False)
    assert not cli.trainer.strategy._ddp_kwargs.get("find_unused_parameters", False)


def test_the_readme_ddp_line_trains_mpl_on_two_cpu_processes(tmp_path):
    result = run_zoo("fit", *quiet_args(tmp_path, "--trainer.strategy=ddp", "--trainer.devices=2",
                                        "--trainer.accelerator=cpu", "--trainer.max_steps=4",
                                        "--trainer.limit_val_batches=0", config=MPL), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _load(tmp_path / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_the_best_checkpoint_keeps_lightnings_state_key_so_older_runs_resume_their_best_score():
    from lightning.pytorch.callbacks import ModelCheckpoint

    from zoo.callbacks import BestCheckpoint

    kwargs = {"monitor": "val/acc", "mode": "max", "every_n_train_steps": 0}
    assert BestCheckpoint(**kwargs).state_key == ModelCheckpoint(**kwargs).state_key
