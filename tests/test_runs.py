"""What surrounds a run: run folders, config copies, W&B run settings, discovery (``zoo list``, config names, short
class names), short errors, the results table, the epoch lines and the schedule length that follows the trainer."""

import re
from pathlib import Path

import pytest
import torch

from conftest import DIGITS, ROOT, quiet_args, run_zoo
from zoo import runs
from zoo.cli import ZooCLI, ZooCLIError, results_table, short_parse_error

CONFIGS = sorted((ROOT / "configs").glob("*/*.yaml"))


def _fit(root: Path, *extra: str) -> ZooCLI:
    return ZooCLI(args=["fit", *quiet_args(root, "--trainer.max_steps=2", "--trainer.limit_val_batches=0", *extra)])


# ---- run folders ----------------------------------------------------------------------------------------------------

def test_two_fits_of_one_config_get_two_folders_and_last_means_the_second(tmp_path):
    first, second = _fit(tmp_path), _fit(tmp_path, "--seed_everything=1")
    assert Path(first.trainer.default_root_dir) == tmp_path / "version_0"
    assert Path(second.trainer.default_root_dir) == tmp_path / "version_1"
    assert runs.last_checkpoint("digits", root=tmp_path) == tmp_path / "version_1" / "checkpoints" / "last.ckpt"
    assert (tmp_path / "latest").resolve() == (tmp_path / "version_1").resolve()
    # `--ckpt_path last` loads the second run's weights, and the test runs in that run's folder
    tested = ZooCLI(args=["test", *quiet_args(tmp_path), "--ckpt_path=last"])
    assert Path(tested.trainer.default_root_dir) == tmp_path / "version_1"
    second_weights = torch.load(tmp_path / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    first_weights = torch.load(tmp_path / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    name = "head.fc.weight"
    assert torch.equal(tested.model.state_dict()[name], second_weights[name])
    assert not torch.equal(first_weights[name], second_weights[name])


def test_a_resumed_fit_continues_in_its_checkpoints_folder(tmp_path):
    _fit(tmp_path)
    resumed = _fit(tmp_path, "--ckpt_path=last", "--trainer.max_steps=4")
    assert Path(resumed.trainer.default_root_dir) == tmp_path / "version_0"
    assert resumed.trainer.global_step == 4 and not (tmp_path / "version_1").exists()


def test_test_and_predict_write_their_own_config_copy_and_predict_makes_no_wandb_run(tmp_path):
    ZooCLI(args=["fit", "-c", str(DIGITS), f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
                 "--trainer.limit_val_batches=0", "--trainer.callbacks=[]", "--test_after_fit=false",
                 "--trainer.enable_progress_bar=false"])  # with the config's W&B logger
    run = tmp_path / "version_0"
    trained_config = (run / "config.yaml").read_text()
    ckpt = run / "checkpoints" / "last.ckpt"
    common = ["-c", str(DIGITS), f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
              "--trainer.callbacks=[]", f"--ckpt_path={ckpt}", "--trainer.limit_test_batches=2",
              "--trainer.limit_predict_batches=2"]
    wandb_runs_before = set((run / "wandb").glob("offline-run-*")) if (run / "wandb").exists() else set()
    ZooCLI(args=["predict", *common])
    assert (run / "predict_config.yaml").is_file()
    wandb_runs_after = set((run / "wandb").glob("offline-run-*")) if (run / "wandb").exists() else set()
    assert wandb_runs_after == wandb_runs_before, "predict made a W&B run"
    ZooCLI(args=["test", *common])
    assert (run / "test_config.yaml").is_file()
    assert (run / "config.yaml").read_text() == trained_config
    assert "ckpt_path" in (run / "test_config.yaml").read_text()


def test_the_saved_config_names_the_run_root_so_a_copy_starts_a_new_run(tmp_path):
    _fit(tmp_path)
    saved = (tmp_path / "version_0" / "config.yaml").read_text()
    assert f"default_root_dir: {tmp_path}\n" in saved and "version_0" not in saved
    again = ZooCLI(args=["fit", "-c", str(tmp_path / "version_0" / "config.yaml"), "--trainer.max_steps=1",
                         "--trainer.limit_val_batches=0"])
    assert Path(again.trainer.default_root_dir) == tmp_path / "version_1"


def test_runs_without_a_version_folder_still_resolve_as_the_latest(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"old layout")
    assert runs.latest_run(tmp_path) == tmp_path
    (tmp_path / "version_3" / "checkpoints").mkdir(parents=True)
    (tmp_path / "version_3" / "checkpoints" / "last.ckpt").write_bytes(b"new")
    (tmp_path / "version_10").mkdir()  # started, no checkpoint yet
    assert runs.latest_run(tmp_path) == tmp_path / "version_3"
    assert runs.next_version(tmp_path) == tmp_path / "version_11"  # by number, not by name order


def test_a_process_that_lightning_launched_uses_rank_zeros_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(runs.RUN_DIR_ENV, str(tmp_path / "version_7"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runs.choose_run_dir(tmp_path) == tmp_path / "version_7"
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert runs.choose_run_dir(tmp_path) == tmp_path / "version_0"  # rank 0 (or a plain run) picks a new one


def test_torchrun_processes_agree_on_a_job_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(runs.RUN_DIR_ENV, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc123")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert runs.choose_run_dir(tmp_path) == tmp_path / "job_abc123"


# ---- W&B ------------------------------------------------------------------------------------------------------------

def test_the_wandb_run_holds_the_whole_config_and_is_named_grouped_and_tagged(tmp_path):
    import wandb

    wandb.finish()
    cli = ZooCLI(args=["fit", "-c", str(DIGITS), f"--trainer.default_root_dir={tmp_path / 'digits'}",
                       "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.callbacks=[]",
                       "--test_after_fit=false", "--trainer.enable_progress_bar=false",
                       "--optimizer.init_args.lr=0.0042", "--data.init_args.split_seed=3",
                       f"--data.init_args.predict_dir={tmp_path / 'my_images'}"])
    run = cli.trainer.logger.experiment
    try:
        config = dict(run.config)
        assert config["optimizer"]["init_args"]["lr"] == pytest.approx(0.0042)
        assert config["data"]["class_path"] == "datamodules.digits.DigitsDataModule"
        assert config["data"]["init_args"]["split_seed"] == 3
        assert config["data"]["init_args"]["predict_dir"] == str(tmp_path / "my_images")  # the data's paths
        assert config["trainer"]["max_steps"] == 2 and config["seed_everything"] == 0
        assert config["run_dir"] == str(tmp_path / "digits" / "version_0")
        assert run.name == "digits/version_0" and run.group == "classification" and run.job_type == "fit"
        assert {"classification", "ImageClassifier", "DigitsDataModule"} <= set(run.tags)
    finally:
        wandb.finish()


def test_the_end_of_a_run_prints_its_folder_and_the_wandb_sync_command(tmp_path):
    result = run_zoo("fit", "-c", str(DIGITS), f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
                     "--trainer.limit_val_batches=0", "--trainer.callbacks=[]", "--test_after_fit=false")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"[zoo] run folder: {tmp_path / 'version_0'}" in result.stdout
    sync = re.search(r"wandb sync (\S+)`", result.stdout)
    assert sync and Path(sync.group(1)).is_dir() and Path(sync.group(1)).parent == tmp_path / "version_0" / "wandb"
    # stdout is a pipe here: one line per epoch instead of a progress bar redrawn at every step
    assert re.search(r"^epoch 1/\d+  step 2 ", result.stdout, re.M)
    assert "it/s]" not in result.stdout + result.stderr
    # upstream notices that say nothing about the run are filtered (Lightning's advert, W&B's anonymous setting, ...)
    assert "warn" not in result.stderr.lower() and "Tip:" not in result.stderr, result.stderr


def test_checkpoints_are_artifacts_online_only(tmp_path):
    offline = ZooCLI(args=["-c", str(DIGITS), f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
                           "--trainer.limit_val_batches=0", "--trainer.callbacks=[]", "--test_after_fit=false"],
                     run=False)
    assert offline.trainer.logger._log_model is False
    online = ZooCLI(args=["-c", str(DIGITS), f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
                          "--trainer.logger.init_args.offline=false", "--trainer.callbacks=[]"], run=False)
    assert online.trainer.logger._log_model is True


# ---- discovery ------------------------------------------------------------------------------------------------------

def test_zoo_list_names_every_config_with_its_model_data_and_result():
    result = run_zoo("list")
    assert result.returncode == 0, result.stderr
    for config in CONFIGS:
        line = next((row for row in result.stdout.splitlines() if f"  {config.stem}  " in f"  {row}  "), None)
        assert line is not None, f"{config.stem} missing from `zoo list`"
        text = config.read_text()
        model = re.search(r"^model:\n  class_path: \S+\.(\w+)", text, re.M).group(1)
        assert model in line, (config, line)
    assert "UDA" in run_zoo("list", "semisup").stdout and "ProtoNet" not in run_zoo("list", "semisup").stdout


def test_every_embedded_default_config_states_its_measured_result():
    from zoo.catalog import catalog

    entries = {e.name: e for e in catalog()}
    assert set(entries) == {c.stem for c in CONFIGS}
    for name in ("digits", "protonet_glyphs", "uda_digits", "gfl_digits", "ecn_synthetic", "ugatit_digits",
                 "api_net_toybirds"):
        assert re.search(r"\d", entries[name].measured), (name, entries[name].measured)


def test_a_config_can_be_named_instead_of_its_path(tmp_path):
    assert runs.find_config("gfl_digits") == ROOT / "configs" / "detection" / "gfl_digits.yaml"
    assert runs.find_config("detection/gfl_digits.yaml") == ROOT / "configs" / "detection" / "gfl_digits.yaml"
    with pytest.raises(FileNotFoundError, match="did you mean gfl_digits"):
        runs.find_config("gfl_digit")
    cli = ZooCLI(args=["-c", "digits", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"], run=False)
    assert type(cli.model).__name__ == "ImageClassifier"


def test_short_class_names_and_help_for_zoo_classes():
    result = run_zoo("fit", "--model.help", "ProtoNet")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "feature_dim" in result.stdout
    assert "ProtoNet" in run_zoo("fit", "--help").stdout  # among --model's known subclasses
    assert "zoo list" in run_zoo("--help").stdout


def test_a_misspelt_key_is_a_short_error_naming_it_and_the_right_one(tmp_path):
    result = run_zoo("fit", "-c", str(DIGITS), "--model.init_args.dropuot=0.1")
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) <= 5, result.stderr
    assert "dropuot" in result.stderr and "'dropout'" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(DIGITS.read_text().replace("  max_epochs: 15", "  max_epocs: 15"))
    result = run_zoo("fit", "-c", str(bad))
    assert result.returncode == 2 and "max_epocs" in result.stderr
    assert len([line for line in result.stderr.strip().splitlines() if line.strip()]) <= 5, result.stderr


def test_short_parse_error_keeps_the_key_the_class_and_close_names():
    message = ("Parser key \"model\":\n  Does not validate against any of the Union subtypes\n  Errors:\n"
               "    - Problem with given class_path 'zoo.fewshot.protonet.ProtoNet':\n"
               "        Option 'featur_dim' is not accepted\n    - Expected a <class 'NoneType'>\n")
    short = short_parse_error(message)
    assert short.splitlines()[0] == ("model: unknown key 'featur_dim' of zoo.fewshot.protonet.ProtoNet. "
                                     "Did you mean 'feature_dim'?")
    assert len(short.splitlines()) <= 2


# ---- console and links ----------------------------------------------------------------------------------------------

def test_results_table_merges_loader_columns_rounds_and_pairs_the_ci():
    per_loader = [
        {"test/acc_5way1shot": 82.8312, "test/ci95_5way1shot": 0.6123, "test/loss": 0.51234567},
        {"test/acc_5way1shot": 82.8312, "test/ci95_5way1shot": 0.6123, "test/loss": 0.51234567,
         "test/acc_20way1shot": 61.2, "test/ci95_20way1shot": 0.5},
    ]
    table = results_table(per_loader, "test results")
    rows = table.splitlines()[2:]
    assert sorted(r.split()[0] for r in rows) == ["test/acc_20way1shot", "test/acc_5way1shot", "test/loss"]
    assert "82.83 ± 0.61" in table and "61.20 ± 0.50" in table and "0.5123" in table
    assert "ci95" not in table


def test_the_cosine_schedule_follows_max_epochs_from_the_command_line(tmp_path):
    def t_max(*extra):
        cli = ZooCLI(args=["-c", str(DIGITS), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                           *extra], run=False)
        return cli.config["lr_scheduler"]["init_args"]["T_max"]

    assert t_max() == 15  # the config's own pair
    assert t_max("--trainer.max_epochs=40") == 40
    assert t_max("--trainer.max_epochs=40", "--lr_scheduler.init_args.T_max=7") == 7


def test_print_config_shows_the_run_root_the_run_uses():
    result = run_zoo("fit", "-c", "digits", "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "default_root_dir: runs/digits\n" in result.stdout


def test_a_config_name_that_matches_nothing_is_a_one_line_error():
    result = run_zoo("fit", "-c", "protonet_glyph")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("zoo: error: config 'protonet_glyph'")
    assert "protonet_glyphs" in result.stderr


def test_zoo_cli_error_is_raised_in_process_for_a_bad_key():
    with pytest.raises(ZooCLIError, match="dropuot"):
        ZooCLI(args=["-c", str(DIGITS), "--model.init_args.dropuot=1", "--trainer.logger=false"], run=False)



def test_a_wrong_type_is_a_one_line_error_naming_the_key_and_the_type():
    message = ('Parser key "data":\n  Does not validate against any of the Union subtypes\n  Subtypes: [<class '
               "'lightning.pytorch.core.datamodule.LightningDataModule'>, <class 'NoneType'>]\n  Errors:\n"
               "    - Problem with given class_path 'datamodules.digits.DigitsDataModule':\n"
               '        Parser key "batch_size":\n          Expected a <class \'int\'>. Got value: abc\n'
               "    - Expected a <class 'NoneType'>\n  Given value type: <class 'jsonargparse._util.NestedArg'>\n")
    assert short_parse_error(message) == "data.init_args.batch_size: expected int, got 'abc'"


def test_an_integer_batch_limit_counts_batches_and_a_float_is_a_fraction(tmp_path):
    cli = ZooCLI(args=["-c", str(DIGITS), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                       "--trainer.limit_val_batches=1", "--trainer.limit_test_batches", "0.5"], run=False)
    assert cli.trainer.limit_val_batches == 1 and isinstance(cli.trainer.limit_val_batches, int)
    assert cli.trainer.limit_test_batches == 0.5
    assert not tmp_path.exists() or not list(tmp_path.iterdir())  # run=False makes no run folder
