"""``zoo predict`` and the per-class test table of the detectors: COCO ``results.json`` that COCOeval scores exactly as
``zoo test`` does, a folder of one's own images at other sizes, the per-class AP table, and the notebook."""

import csv
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, prediction_folder
from PIL import Image

from datamodules.base import read_image
from datamodules.detection import DigitCanvasDataModule
from zoo.detection.evaluation import DetectionMetrics
from zoo.detection.predict import DetectionPredictionWriter

CONFIG = ROOT / "configs" / "detection" / "gfl_digits.yaml"
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.callbacks=[]"]
# Evaluation resized to 48 px (the tiny run's canvases are 64): results must be scaled back to the files' pixels to
# match. score_threshold 0: a barely trained detector still gives 100 boxes per image, so the mAP is not a trivial 0.
EVAL = ["--data.init_args.min_size=48", "--data.init_args.max_size=48", "--model.init_args.score_threshold=0.0"]


def coco_eval_map(annotations: Path, results: Path) -> tuple[float, float]:
    """``(AP, AP50)`` of a results file against a COCO annotation file, by faster_coco_eval's COCOeval."""
    from faster_coco_eval import COCO, COCOeval_faster

    ground_truth = COCO(str(annotations))
    evaluation = COCOeval_faster(ground_truth, ground_truth.loadRes(str(results)), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return float(evaluation.stats[0]), float(evaluation.stats[1])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One tiny GFL run on a small set of 64-px canvases (24 steps, no warm-up: enough for a test mAP above 0): its
    data arguments and checkpoint."""
    from zoo.cli import ZooCLI

    tmp = tmp_path_factory.mktemp("gfl_digits")
    data = [f"--data.init_args.root={tmp / 'canvas'}", "--data.init_args.canvas_size=64", "--data.init_args.max_digit=32",
            "--data.init_args.num_train=128", "--data.init_args.num_val=2", "--data.init_args.num_test=10"]
    ZooCLI(args=["fit", "-c", str(CONFIG), *data, *QUIET, f"--trainer.default_root_dir={tmp / 'run'}",
                 "--trainer.max_epochs=3", "--trainer.limit_val_batches=0", "--test_after_fit=false",
                 "--model.init_args.warmup_iters=0", "--model.init_args.lr=0.005"])
    checkpoint = next((tmp / "run").rglob("last.ckpt"))
    return SimpleNamespace(tmp=tmp, data=data, checkpoint=checkpoint, canvas=tmp / "canvas")


@pytest.fixture(scope="module")
def digits_test_and_predict(digits_run):
    """``zoo test`` then ``zoo predict`` of the tiny run's checkpoint on the test split (evaluated at 48 px)."""
    from zoo.cli import ZooCLI

    args = [*digits_run.data, *QUIET, *EVAL, f"--ckpt_path={digits_run.checkpoint}"]
    tested = ZooCLI(args=["test", "-c", str(CONFIG), *args])
    metrics = {k: float(v) for k, v in tested.trainer.callback_metrics.items()}
    predicted = ZooCLI(args=["predict", "-c", str(CONFIG), *args])
    return SimpleNamespace(metrics=metrics, test_root=Path(tested.trainer.default_root_dir),
                           predictions=prediction_folder(predicted))


def test_results_json_scored_by_coco_eval_against_the_split_file_equals_the_test_map(digits_run,
                                                                                     digits_test_and_predict):
    predictions, metrics = digits_test_and_predict.predictions, digits_test_and_predict.metrics
    annotations = digits_run.canvas / "annotations" / "instances_test.json"
    results = json.loads((predictions / "results.json").read_text())
    assert {r["image_id"] for r in results} == {image["id"] for image in json.loads(annotations.read_text())["images"]}
    assert {r["category_id"] for r in results} <= set(range(1, 11))  # the set's ids "0".."9" -> 1..10, not labels
    assert metrics["test/map"] > 0
    ap, ap50 = coco_eval_map(annotations, predictions / "results.json")
    assert ap == pytest.approx(metrics["test/map"], abs=1e-6)
    assert ap50 == pytest.approx(metrics["test/map_50"], abs=1e-6)
    drawn = sorted(p.name for p in (predictions / "images").glob("*.png"))
    assert drawn == [f"{i:06d}.png" for i in range(10)]  # the first 16 of 10 images: all, named as their files
    categories = json.loads((predictions / "categories.json").read_text())
    assert categories[3] == {"id": 4, "name": "3"}


def test_per_class_ap_table_has_one_row_per_class_and_its_mean_is_the_test_map(digits_run, digits_test_and_predict):
    metrics = digits_test_and_predict.metrics
    with open(digits_test_and_predict.test_root / "tables" / "test_per_class_ap.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class_id"] for r in rows] == [str(i) for i in range(10)]
    assert [r["class_name"] for r in rows] == [str(i) for i in range(10)]
    annotations = json.loads((digits_run.canvas / "annotations" / "instances_test.json").read_text())["annotations"]
    counts = np.bincount([a["category_id"] - 1 for a in annotations], minlength=10)
    assert [int(r["gt_boxes"]) for r in rows] == counts.tolist()
    # COCOeval leaves a class without ground truth out of the mAP; its AP cells are empty.
    assert all((r["AP"] == "") == (c == 0) for r, c in zip(rows, counts))
    filled = [r for r in rows if r["AP"] != ""]
    assert np.mean([float(r["AP"]) for r in filled]) == pytest.approx(metrics["test/map"], abs=1e-5)  # 6-digit csv
    assert np.mean([float(r["AP50"]) for r in filled]) == pytest.approx(metrics["test/map_50"], abs=1e-5)


def test_predict_on_a_folder_of_three_pngs_at_other_sizes_writes_exactly_those_files(digits_run, tmp_path):
    from zoo.cli import ZooCLI

    folder = tmp_path / "mine"
    (folder / "nested").mkdir(parents=True)
    canvases = sorted((digits_run.canvas / "test").glob("*.png"))[:3]
    sizes = {"wide.png": (200, 150), "tall.png": (96, 160), "nested/square.png": (256, 256)}  # PIL: (width, height)
    for (name, size), source, mode in zip(sizes.items(), canvases, ("L", "RGB", "L")):
        Image.open(source).convert(mode).resize(size).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    cli = ZooCLI(args=["predict", "-c", str(CONFIG), *digits_run.data, *QUIET, "--model.init_args.score_threshold=0.0",
                       f"--ckpt_path={digits_run.checkpoint}", f"--data.init_args.predict_dir={folder}",
                       f"--trainer.default_root_dir={tmp_path / 'run'}"])
    predictions = prediction_folder(cli)
    results = json.loads((predictions / "results.json").read_text())
    assert {r["file_name"] for r in results} == set(sizes)
    assert all("image_id" not in r for r in results)
    for name, (width, height) in sizes.items():
        boxes = np.array([r["bbox"] for r in results if r["file_name"] == name])
        assert len(boxes) > 0
        assert (boxes >= 0).all()  # (an untrained detector's box clipped at the border can be flat: w or h 0)
        assert (boxes[:, 0] + boxes[:, 2] <= width + 1e-3).all() and (boxes[:, 1] + boxes[:, 3] <= height + 1e-3).all()
        # the boxes use the whole file, not the 64-px input: some reach past the input's size
        assert (boxes[:, :2] + boxes[:, 2:]).max() > 64
        drawn = predictions / "images" / Path(name).with_suffix(".png")
        assert Image.open(drawn).size == (width, height)


def test_predict_transform_of_a_canvas_file_is_the_test_split_input(tmp_path):
    data = DigitCanvasDataModule(root=str(tmp_path / "canvas"), num_train=1, num_val=1, num_test=3, min_size=96,
                                 max_size=96)
    data.setup("test")
    transform = data.predict_transform()
    for index in range(3):
        image, target = data.test_set[index]
        from_file = transform(read_image(data.test_set.records.paths[index], data.predict_image_mode))
        assert from_file.shape == image.shape == (3, 96, 96)
        assert torch.equal(from_file, image)


def test_coco_datamodule_serves_a_folder_without_the_coco_files_at_the_test_size(tmp_path):
    from datamodules.base import DatasetNotFoundError
    from datamodules.detection import CocoDetectionDataModule

    folder = tmp_path / "mine"
    folder.mkdir()
    for name, size in {"a.png": (90, 30), "b.jpg": (40, 80)}.items():  # (width, height)
        Image.new("RGB", size, (200, 10, 10)).save(folder / name)
    data = CocoDetectionDataModule(root=str(tmp_path / "no_coco_here"), min_size=32, max_size=64, eval_batch_size=2,
                                   predict_dir=str(folder))
    data.setup("predict")  # no COCO annotation file is read for a folder
    batch = next(iter(data.predict_dataloader()))
    # shorter side 32 unless the longer one would pass 64: 30 x 90 -> 21 x 64, 80 x 40 -> 64 x 32
    assert [tuple(image.shape) for image in batch["image"]] == [(3, 21, 64), (3, 64, 32)]
    assert batch["size"].tolist() == [[30, 90], [80, 40]]
    assert [Path(p).name for p in batch["path"]] == ["a.png", "b.jpg"]
    with pytest.raises(DatasetNotFoundError):
        data.class_names  # the names come from the annotation file: the writer falls back to "0".."C-1"


def test_writer_uses_the_datasets_sparse_category_ids_and_coco_eval_agrees_with_detection_metrics(tmp_path):
    """Hand-made detections (jittered true boxes, some with the wrong class) of a COCO-format set whose category ids are
    sparse (5, 17, 90): ``results.json`` scored by COCOeval against the file equals ``DetectionMetrics`` on labels."""
    rng = np.random.default_rng(0)
    category_ids, names = [5, 17, 90], ["cat", "dog", "zebra"]
    images, annotations, outputs, targets = [], [], [], []
    for image_id in (3, 8, 11, 40):
        count = int(rng.integers(1, 5))
        corner = rng.uniform(0, 80, (count, 2))
        # whole pixels: the same numbers in the json and as float32 targets
        boxes = np.round(np.concatenate([corner, corner + rng.uniform(10, 40, (count, 2))], axis=1))
        labels = rng.integers(0, 3, count)
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 120, "height": 120})
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_ids[label],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        guessed = np.where(rng.random(count) < 0.3, (labels + 1) % 3, labels)
        outputs.append({"boxes": torch.tensor(boxes + rng.normal(0, 3, boxes.shape), dtype=torch.float32),
                        "scores": torch.tensor(rng.random(count), dtype=torch.float32),
                        "labels": torch.tensor(guessed), "image_id": torch.tensor(image_id)})
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "iscrowd": torch.zeros(count, dtype=torch.bool), "image_id": torch.tensor(image_id)})
    truth = tmp_path / "instances.json"
    truth.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [
        {"id": i, "name": n} for i, n in zip(category_ids, names)]}))

    writer = DetectionPredictionWriter(num_drawn=0, output_dir=str(tmp_path / "out"))
    datamodule = SimpleNamespace(predict_dir=None, test_set=None)
    module = SimpleNamespace(class_names_and_ids=lambda: (names, category_ids))
    trainer = SimpleNamespace(datamodule=datamodule, default_root_dir=str(tmp_path), world_size=1, is_global_zero=True)
    writer.on_predict_start(trainer, module)
    for batch in (outputs[2:], outputs[:2]):  # batches out of id order: results.json is sorted by image id
        writer.write_on_batch_end(trainer, module, batch, None, None, 0, 0)
    writer.on_predict_epoch_end(trainer, module)

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["image_id"] for r in results] == sorted(r["image_id"] for r in results)
    assert {r["category_id"] for r in results} <= set(category_ids)
    first = outputs[0]
    x1, y1, x2, y2 = first["boxes"][0].tolist()
    assert results[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-4)
    assert results[0]["category_id"] == category_ids[int(first["labels"][0])]
    metrics = DetectionMetrics()
    metrics.update(outputs, targets)
    expected = float(metrics.compute()["map"])
    assert 0.05 < expected < 0.95  # neither trivial value
    assert coco_eval_map(truth, tmp_path / "out" / "results.json")[0] == pytest.approx(expected, abs=1e-6)


def test_per_class_rows_mean_equals_map_and_classes_without_truth_are_nan():
    generator = torch.Generator().manual_seed(0)
    preds, targets = [], []
    for image in range(6):
        boxes = torch.rand(3, 2, generator=generator) * 60
        boxes = torch.cat([boxes, boxes + 20], dim=1)
        labels = torch.tensor([0, 1, 1])
        predicted = torch.tensor([0, 1, 3])  # class 3 is predicted but has no ground truth; class 2 never appears
        preds.append({"boxes": boxes + torch.randn(3, 4, generator=generator) * 4, "labels": predicted,
                      "scores": torch.rand(3, generator=generator)})
        targets.append({"boxes": boxes, "labels": labels, "iscrowd": torch.zeros(3, dtype=torch.bool),
                        "image_id": torch.tensor(image)})
    metrics = DetectionMetrics(per_class=True)
    metrics.update(preds, targets)
    results = metrics.compute()
    rows = results["per_class"].cpu()
    assert rows[:, 0].tolist() == [0, 1, 3]
    assert rows[:, 4].tolist() == [6, 12, 0]
    assert torch.isnan(rows[2, 1:4]).all() and not torch.isnan(rows[:2, 1:4]).any()
    assert rows[:2, 1].mean().item() == pytest.approx(results["map"].item(), abs=1e-6)
    assert rows[:2, 2].mean().item() == pytest.approx(results["map_50"].item(), abs=1e-6)
    assert rows[:2, 3].mean().item() == pytest.approx(results["map_75"].item(), abs=1e-6)


@pytest.mark.slow
def test_detection_notebook_executes_and_prints_detections_and_per_class_ap():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(ROOT / "notebooks" / "detection_on_an_image.ipynb", as_version=4)
    environment = {key: os.environ.pop(key) for key in ("ZOO_CKPT",) if key in os.environ}
    try:
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        os.environ.update(environment)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert re.search(r"checkpoint: \S+\.ckpt", text)
    assert re.search(r"^\s*\d\s+0\.\d{3}\s+\[", text, re.M), "no detection (class, score, box) printed"
    assert any("image/png" in o.get("data", {}) for o in outputs), "no drawn image displayed"
    per_class = re.findall(r"^\s*(\d)\s+\S+\s+([0-9.]+|-)\s+([0-9.]+|-)", text, re.M)
    assert len({row[0] for row in per_class}) == 10
    test_map = float(re.search(r"test mAP: ([0-9.]+)", text).group(1))
    assert test_map > 0
    assert float(re.search(r"mean of the per-class AP: ([0-9.]+)", text).group(1)) == pytest.approx(test_map, abs=2e-4)
