import pytest
import yaml

from conftest import DIGITS, ROOT, quiet_args, run_zoo, write_cifar10, write_image_folder
from datamodules.base import DatasetNotFoundError
from zoo.cli import ZooCLI

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def _pretrained_keys(node, path: str = "") -> list[str]:
    """Dotted paths of every ``pretrained: true`` in a config (backbones nest at different depths)."""
    if isinstance(node, dict):
        return [k for key, value in node.items()
                for k in ([f"{path}{key}"] if key == "pretrained" and value is True
                          else _pretrained_keys(value, f"{path}{key}."))]
    return []


def test_print_config_shows_class_paths_and_defaults():
    result = run_zoo("fit", "-c", str(DIGITS), "--print_config")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "class_path: zoo.classification.classifier.ImageClassifier" in out
    assert "class_path: lightning.pytorch.loggers.WandbLogger" in out and "offline: true" in out
    assert "last_checkpoint:" in out and "finetune:" in out


def test_unknown_config_key_exits_nonzero_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DIGITS.read_text().replace("dropout: 0.2", "dropout: 0.2\n    dropuot: 0.5"))
    result = run_zoo("fit", "-c", str(bad), "--trainer.logger=false")
    assert result.returncode != 0
    assert "dropuot" in result.stderr


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT / "configs")) for c in CONFIGS])
def test_every_config_builds(config, tmp_path):
    args = ["-c", str(config), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    for key in _pretrained_keys(yaml.safe_load(config.read_text())):  # tests never download weights
        args.append(f"--{key}=false")
    if "light: false" in config.read_text():  # U-GAT-IT full: 2 × 279 M generator parameters, a minute to initialise
        args.append("--model.init_args.light=true")
    cli = ZooCLI(args=args, run=False)
    assert cli.model is not None and cli.datamodule is not None
    try:
        data_classes = getattr(cli.datamodule, "num_classes", None)
    except DatasetNotFoundError:  # COCO's classes come from its annotation file, absent here
        data_classes = None
    if data_classes is not None and hasattr(cli.model, "hparams") and "num_classes" in cli.model.hparams:
        assert cli.model.hparams.num_classes == data_classes


def test_digits_config_fast_dev_run(tmp_path):
    ZooCLI(args=["fit", *quiet_args(tmp_path, "--trainer.fast_dev_run=true")])


def test_default_run_writes_wandb_offline_and_cam_images(tmp_path):
    # The config as users run it (W&B logger, CAM logger, baselines), only shorter.
    cli = ZooCLI(args=["fit", "-c", str(DIGITS), f"--trainer.default_root_dir={tmp_path}",
                       "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
                       "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false"])
    assert list((tmp_path / "version_0" / "wandb").glob("offline-run-*")), "no offline W&B run written"
    assert (tmp_path / "version_0" / "checkpoints" / "last.ckpt").is_file()
    metrics = cli.trainer.callback_metrics
    assert {"test/acc", "baseline/logreg_acc", "baseline/1nn_acc"} <= set(metrics)
    assert float(metrics["baseline/1nn_acc"]) > 0.95  # 1-NN on digits pixels is ~0.98


@pytest.mark.parametrize("name", ["resnet18_cifar10", "timm_imagefolder"])
def test_real_data_configs_fast_dev_run_on_format_fixtures(name, tmp_path):
    data = tmp_path / "data"
    if "cifar" in name:
        write_cifar10(data, per_batch=10)
        extra = ["--data.init_args.val_size=10"]
    else:
        write_image_folder(data, classes=[f"c{i}" for i in range(10)], per_class=2)
        extra = ["--data.init_args.image_size=64", "--model.init_args.backbone.init_args.pretrained=false"]
    config = ROOT / "configs" / "classification" / f"{name}.yaml"
    cli = ZooCLI(args=["fit", *quiet_args(tmp_path / "run", config=config), "--trainer.fast_dev_run=true",
                 f"--data.init_args.root={data}", "--data.init_args.num_workers=0", "--data.init_args.batch_size=4",
                 "--trainer.precision=32-true", *extra])  # fp16/bf16 autocast is a GPU setting; CPU runs fp32 here
    assert cli.trainer.global_step == 1  # one real optimizer step on the fixture batch
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 10


@pytest.mark.parametrize("form", ["equals", "separate", "yaml-flow"])
def test_a_callbacks_override_replaces_the_configs_callbacks(form):
    # digits.yaml lists CAMLogger(num_images=8) and PixelBaselines; the override keeps one CAMLogger with 4 images.
    value = ('[{"class_path": "zoo.cam.CAMLogger", "init_args": {"num_images": 4}}]'
             if form != "yaml-flow" else "[{class_path: zoo.cam.CAMLogger, init_args: {num_images: 4}}]")
    override = ["--trainer.callbacks", value] if form == "separate" else [f"--trainer.callbacks={value}"]
    cli = ZooCLI(args=["-c", str(DIGITS), "--trainer.logger=false", *override], run=False)
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert names.count("CAMLogger") == 1 and "PixelBaselines" not in names
    assert next(c for c in cli.trainer.callbacks if type(c).__name__ == "CAMLogger").num_images == 4
    assert names.count("LearningRateLogger") == 1  # the CLI's own default, added once


def test_lightnings_distributed_sampler_is_off_by_default_and_no_config_repeats_it():
    cli = ZooCLI(args=["-c", str(DIGITS), "--trainer.logger=false"], run=False)
    assert cli.trainer._accelerator_connector.use_distributed_sampler is False
    assert not [c.name for c in CONFIGS if "use_distributed_sampler" in c.read_text()]
