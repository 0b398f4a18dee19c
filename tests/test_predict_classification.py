"""``zoo predict`` and the test confusion matrix of the classifiers: the reference classifier on digits, a
semi-supervised method, API-Net on toy birds, and the file-reading datamodules (ImageFolder, CIFAR)."""

import csv
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from conftest import DIGITS, ROOT, quiet_args, run_zoo, write_cifar10, write_image_folder, prediction_folder
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, default_collate

from datamodules.base import ImageFileDataset, list_images
from datamodules.classification import CIFAR10DataModule, ImageFolderDataModule
from datamodules.digits import DigitsDataModule
from datamodules.semisup import CIFAR10SemiSupDataModule, DigitsSemiSupDataModule
from zoo.backbones import ConvNet
from zoo.classification.classifier import ImageClassifier
from zoo.classifier import ClassificationPredictionWriter
from zoo.cli import ZooCLI

PREDICT_COLUMNS = ["path", "pred", "pred_name", "prob", "top5"]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def zoo_fit(root: Path, *args: str, config: Path = DIGITS) -> Path:
    """A quiet ``zoo fit`` under ``root``; returns its ``last.ckpt`` (in the run folder the CLI chose)."""
    cli = ZooCLI(args=["fit", *quiet_args(root, *args, config=config)])
    ckpt = Path(cli.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


def zoo_predict(ckpt: Path, *args: str, config: Path = DIGITS) -> tuple[list[dict[str, str]], ZooCLI]:
    """``zoo predict`` of ``ckpt``: the rows of the ``predictions.csv`` it wrote, and the CLI."""
    cli = ZooCLI(args=["predict", *quiet_args(ckpt.parents[1], f"--ckpt_path={ckpt}", *args, config=config)])
    return read_rows(prediction_folder(cli) / "predictions.csv"), cli


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory) -> Path:
    """``last.ckpt`` of a short 1-epoch quiet digits run (8 training batches)."""
    return zoo_fit(tmp_path_factory.mktemp("digits_run"), "--trainer.max_epochs=1", "--trainer.limit_train_batches=8",
                   "--trainer.limit_val_batches=1")


def write_test_digits_as_pngs(folder: Path, count: int = 3) -> list[int]:
    """The first ``count`` digits of the digits config's test split as 8×8 grey PNGs (ink light on dark, 0-255);
    returns their positions in the test split."""
    data = DigitsDataModule()
    data.setup()
    test_index = data._splits["test"][:count]
    images = load_digits().images
    folder.mkdir(parents=True)
    for position, index in enumerate(test_index):
        pixels = np.round(images[index] / 16 * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"digit_{position}.png")
    return list(range(count))


# ---------------------------------------------------------------- digits: folder, test split, confusion matrix


def test_predict_on_a_folder_writes_one_row_per_image(digits_ckpt, tmp_path):
    positions = write_test_digits_as_pngs(tmp_path / "pngs")
    files = sorted((tmp_path / "pngs").glob("*.png"))
    rows, _ = zoo_predict(digits_ckpt, f"--data.init_args.predict_dir={tmp_path / 'pngs'}")

    assert len(rows) == 3 and list(rows[0]) == PREDICT_COLUMNS  # no label column: the files have no labels
    assert [Path(row["path"]) for row in rows] == files
    for row in rows:
        assert 0 < float(row["prob"]) <= 1
        top = row["top5"].split()
        assert len(top) == 5 and top[0] == row["pred"] and len(set(top)) == 5
        assert row["pred_name"] == row["pred"]  # digits' class names are "0".."9"

    # A PNG of a test digit is read as the test split holds it (grey, bilinear to 32 px, [0, 1]): same prediction,
    # probability equal up to the PNG's 8-bit rounding of the 17 grey levels.
    split, _ = zoo_predict(digits_ckpt)
    for row, position in zip(rows, positions):
        assert row["pred"] == split[position]["pred"]
        assert float(row["prob"]) == pytest.approx(float(split[position]["prob"]), abs=0.02)


def test_predict_on_the_test_split_gives_the_accuracy_zoo_test_logs(digits_ckpt, tmp_path):
    # `zoo test` with the config's W&B logger (offline here), which gets the confusion matrix as a table and a plot.
    quiet = [arg for arg in quiet_args(digits_ckpt.parents[1], f"--ckpt_path={digits_ckpt}")
             if arg != "--trainer.logger=false"]
    tested = ZooCLI(args=["test", *quiet])
    test_acc = float(tested.trainer.callback_metrics["test/acc"])
    run = Path(tested.trainer.default_root_dir)
    tables = [path.name for folder in (run, tmp_path) for path in folder.rglob("*.table.json")
              if path.parent.name == "test"]  # W&B media/table/test/<key>_<step>_<hash>.table.json
    assert any(re.match(r"confusion_matrix_\d+_", name) for name in tables), tables
    assert any(name.startswith("confusion_matrix_plot") for name in tables), tables
    rows, _ = zoo_predict(digits_ckpt)

    assert list(rows[0]) == [*PREDICT_COLUMNS, "label"]
    assert [row["path"] for row in rows] == [str(i) for i in range(360)]  # in-memory split: the item index, in order
    data = DigitsDataModule()
    data.setup()
    assert [int(row["label"]) for row in rows] == data.test_set.labels.tolist()
    accuracy = np.mean([row["pred"] == row["label"] for row in rows])
    assert accuracy == pytest.approx(test_acc, abs=1e-6)

    # The confusion matrix of the same test: rows true class, columns predicted class, counts.
    table = read_rows(Path(tested.trainer.default_root_dir) / "tables" / "test_confusion_matrix.csv")
    assert [row["true_class"] for row in table] == [str(d) for d in range(10)]
    counts = np.array([[int(row[str(p)]) for p in range(10)] for row in table])
    assert counts.sum() == 360
    assert np.trace(counts) / counts.sum() == pytest.approx(test_acc, abs=1e-6)
    assert counts.sum(axis=1).tolist() == np.bincount(data.test_set.labels.numpy(), minlength=10).tolist()
    predicted = np.bincount([int(row["pred"]) for row in rows], minlength=10)
    assert counts.sum(axis=0).tolist() == predicted.tolist()  # the predictions file and the matrix agree


@pytest.mark.slow  # 2-process DDP runs on the CPU, 1-2 min
def test_two_process_predict_and_test_write_what_one_process_writes(digits_ckpt, tmp_path):
    single, cli = zoo_predict(digits_ckpt)
    run = Path(cli.trainer.default_root_dir)
    one_matrix = ZooCLI(args=["test", *quiet_args(run, f"--ckpt_path={digits_ckpt}")])
    one_matrix = read_rows(Path(one_matrix.trainer.default_root_dir) / "tables" / "test_confusion_matrix.csv")
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    for command in ("predict", "test"):
        result = run_zoo(command, *quiet_args(run, f"--ckpt_path={digits_ckpt}", *ddp), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    # rank r predicts items r, r + 2, ...: the gathered rows are put back in dataset order
    assert read_rows(run / "predictions" / "predictions.csv") == single
    assert read_rows(run / "tables" / "test_confusion_matrix.csv") == one_matrix  # the ranks' counts summed


def test_test_confusion_matrix_matches_hand_counts():
    model = ImageClassifier(backbone=ConvNet(1, widths=[4]), num_classes=3)
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    labels = torch.tensor([0, 1, 0, 2, 2])
    model.test_confusion.update(logits, labels)
    assert model.test_confusion.compute().tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


# ---------------------------------------------------------------- semi-supervised and fine-grained configs


def test_a_semisupervised_checkpoint_predicts_the_test_split_and_a_folder(tmp_path):
    config = ROOT / "configs" / "semisup" / "uda_digits.yaml"
    ckpt = zoo_fit(tmp_path / "uda", "--trainer.max_steps=2", config=config)
    rows, _ = zoo_predict(ckpt, config=config)
    assert len(rows) == 540 and list(rows[0]) == [*PREDICT_COLUMNS, "label"]  # the 30 % test split of 1,797

    write_test_digits_as_pngs(tmp_path / "pngs", count=2)
    rows, _ = zoo_predict(ckpt, f"--data.init_args.predict_dir={tmp_path / 'pngs'}", config=config)
    assert [Path(row["path"]).name for row in rows] == ["digit_0.png", "digit_1.png"]
    assert all(0 < float(row["prob"]) <= 1 and row["pred_name"] == row["pred"] for row in rows)


def test_api_net_predicts_the_toy_birds_test_files_with_their_class_names(tmp_path):
    config = ROOT / "configs" / "finegrained" / "api_net_toybirds.yaml"
    birds = ["--data.init_args.root=" + str(tmp_path / "birds"), "--data.init_args.train_per_class=4",
             "--data.init_args.test_per_class=2", "--data.init_args.classes_per_batch=3",
             "--data.init_args.images_per_class=2"]
    ckpt = zoo_fit(tmp_path / "run", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                   "--trainer.limit_val_batches=1", *birds, config=config)
    rows, cli = zoo_predict(ckpt, *birds, config=config)
    test_set = cli.datamodule.test_set
    assert len(rows) == 24  # 12 classes × 2 test images
    assert [row["path"] for row in rows] == [str(f) for f in test_set.files]  # files of the split, in order
    assert [int(row["label"]) for row in rows] == test_set.labels.tolist()
    names = cli.datamodule.class_names
    assert all(row["pred_name"] == names[int(row["pred"])] for row in rows)
    assert len(rows[0]["top5"].split()) == 5

    folder = tmp_path / "own"
    folder.mkdir()
    for i, file in enumerate(test_set.files[:2]):
        Image.open(file).resize((80, 70)).save(folder / f"bird{i}.jpg")  # any size: resized and cropped as a test image
    rows, _ = zoo_predict(ckpt, *birds, f"--data.init_args.predict_dir={folder}", config=config)
    assert [Path(row["path"]).name for row in rows] == ["bird0.jpg", "bird1.jpg"]


# ---------------------------------------------------------------- the file-reading datamodules


def test_image_folder_predictions_name_the_files_and_folder_classes(tmp_path):
    write_image_folder(tmp_path / "data", classes=("cat", "dog", "eel"), per_class=2)
    data = ImageFolderDataModule(root=str(tmp_path / "data"), image_size=16, batch_size=4, num_workers=0,
                                 pin_memory=False)
    model = ImageClassifier(backbone=ConvNet(3, widths=[4]), num_classes=3)
    trainer = L.Trainer(default_root_dir=tmp_path / "run", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[model.prediction_writer()])
    trainer.predict(model, datamodule=data, return_predictions=False)
    rows = read_rows(tmp_path / "run" / "predictions" / "predictions.csv")
    # test/ is absent: the test split is val/, files in ImageFolder's order, labels from the folder names
    assert [row["path"] for row in rows] == [str(p) for p in sorted((tmp_path / "data" / "val").rglob("*.jpg"))]
    assert [row["label"] for row in rows] == ["0", "0", "1", "1", "2", "2"]
    assert all(row["pred_name"] == ["cat", "dog", "eel"][int(row["pred"])] for row in rows)
    assert all(len(row["top5"].split()) == 3 for row in rows)  # k = min(5, classes)

    data.predict_dir = str(tmp_path / "data" / "train" / "dog")
    trainer.predict(model, datamodule=data, return_predictions=False)
    assert read_rows(tmp_path / "run" / "predictions" / "predictions.csv")[0]["path"].endswith(".jpg")  # kept
    rows = read_rows(tmp_path / "run" / "predictions" / "dog" / "predictions.csv")
    assert [Path(row["path"]).name for row in rows] == ["0.jpg", "1.jpg"] and "label" not in rows[0]


def test_predict_transforms_give_the_test_splits_tensors(tmp_path):
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    write_cifar10(tmp_path / "cifar")
    cifar = CIFAR10DataModule(root=str(tmp_path / "cifar"), val_size=0, num_workers=0, pin_memory=False)
    cifar.setup()
    assert cifar.class_names == [f"class{i}" for i in range(10)]  # from batches.meta
    assert cifar.predict_transform()(picture).shape == cifar.test_set[0][0].shape == (3, 32, 32)
    semisup = CIFAR10SemiSupDataModule(root=str(tmp_path / "cifar"), num_labels_per_class=1, num_workers=0,
                                       pin_memory=False)
    semisup.setup()
    assert semisup.class_names == cifar.class_names
    # A 32-px image goes through unchanged but for the tensor conversion and normalisation, as the test split's.
    as_file = semisup.predict_transform()(Image.fromarray(cifar.test_set.data[0]))
    assert torch.allclose(as_file, semisup.test_set[0][0], atol=1e-6)

    digits = DigitsSemiSupDataModule(image_size=16)
    assert digits.predict_image_mode == "L"
    assert digits.predict_transform()(picture.convert("L")).shape == (1, 16, 16)
    assert DigitsDataModule(channels=1).predict_image_mode == "L"
    assert DigitsDataModule(channels=3).predict_image_mode == "RGB"


def test_writer_orders_rows_by_item_index_and_names_classes(tmp_path):
    # Batches may arrive in any order (DDP ranks, shards): the file is in item order all the same.
    for i in range(3):
        Image.fromarray(np.full((8, 8), 60 * i, dtype=np.uint8), mode="L").save(tmp_path / f"{i}.png")
    dataset = ImageFileDataset(list_images(tmp_path), DigitsDataModule().predict_transform(), "L")
    writer = ClassificationPredictionWriter(output_dir=str(tmp_path / "out"))
    trainer = SimpleNamespace(global_rank=0, world_size=1, predict_dataloaders=DataLoader(dataset),
                              datamodule=SimpleNamespace(class_names=["ant", "bee", "cow"]))
    module = SimpleNamespace(test_confusion=SimpleNamespace(num_classes=3))
    rows = []
    for index in ([2], [0, 1]):
        batch = default_collate([dataset[i] for i in index])
        probs = torch.tensor([[0.1, 0.7, 0.2]]).repeat(len(index), 1)
        rows += writer.rows({"probs": probs, "preds": probs.argmax(-1)}, batch, 0, tmp_path, trainer, module)
    assert [row.index for row in rows] == [2, 0, 1]
    written = writer.finish(rows, tmp_path / "out", trainer, module)
    assert written == [tmp_path / "out" / "predictions.csv"]
    assert read_rows(written[0]) == [{"path": str(tmp_path / f"{i}.png"), "pred": "1", "pred_name": "bee",
                                      "prob": "0.7", "top5": "1 2 0"} for i in range(3)]
