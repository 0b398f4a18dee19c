"""Detection data: COCO / VOC parsing in their real formats, the batch contract, transforms, aspect-ratio batches,
DDP sharding, missing and malformed data, and the digits-on-canvas default."""

import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from datamodules.base import CorruptImageError, DatasetNotFoundError
from datamodules.detection import (VOC_CLASSES, AspectRatioBatchSampler, CocoDetection, CocoDetectionDataModule,
                                   DigitCanvasDataModule, ResizeShortestSide, VOCDetection, VOCDetectionDataModule,
                                   detection_collate, detection_transform)
from datamodules.generated.detection_digit_canvas import resize_digit, write_digit_canvas

# --------------------------------------------------------------------------------------------------------------------
# Fixtures in the real formats


def _jpeg(path: Path, width: int, height: int, seed: int = 0, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, quality=90)


# image id → (width, height); sorted by id: 3 (portrait), 7 (landscape), 12 (square, no annotations)
COCO_IMAGES = {7: (40, 30), 3: (30, 50), 12: (20, 20)}


def coco_json(changes: dict | None = None) -> dict:
    """The tiny set's json; ``changes`` maps an annotation id to fields to override."""
    annotations = [
        {"id": 1, "image_id": 7, "category_id": 18, "bbox": [5, 6, 10, 8], "area": 80, "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 1},
        {"id": 3, "image_id": 7, "category_id": 90, "bbox": [1, 1, 0, 5], "area": 0, "iscrowd": 0},  # zero width
        {"id": 4, "image_id": 3, "category_id": 90, "bbox": [2.5, 3, 10, 12], "area": 120, "iscrowd": 0},
        {"id": 5, "image_id": 3, "category_id": 1, "bbox": [25, 40, 10, 20], "area": 200, "iscrowd": 0},  # partly out
        {"id": 6, "image_id": 3, "category_id": 18, "bbox": [100, 100, 5, 5], "area": 25, "iscrowd": 0},  # fully out
    ]
    for ann in annotations:
        ann.update((changes or {}).get(ann["id"], {}))
    return {
        "info": {"description": "tiny"},
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h} for i, (w, h) in COCO_IMAGES.items()],
        "annotations": annotations,
        # listed out of order, sparse ids as in COCO
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }


def write_coco(root: Path, changes: dict | None = None) -> Path:
    for split in ("train2017", "val2017"):
        for i, (w, h) in COCO_IMAGES.items():
            _jpeg(root / split / f"{i:012d}.jpg", w, h, seed=i, mode="L" if i == 12 else "RGB")
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco_json(changes)))
    return root


VOC_XML = """<annotation>
  <folder>VOC{year}</folder><filename>{name}.jpg</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  <segmented>0</segmented>
  {objects}
</annotation>"""
VOC_OBJECT = ("<object><name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated>{difficult}"
              "<bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>")
VOC_IMAGES = {  # name → (w, h, [(class, xmin, ymin, xmax, ymax, difficult or None)])
    "000005": (50, 40, [("chair", 10, 20, 30, 35, 0), ("person", 1, 1, 50, 40, 1)]),
    "000007": (30, 60, [("car", 5, 6, 25, 50, None)]),  # no <difficult> tag, as in some VOC2012 files
}


def write_voc(devkit: Path, year: str = "2007", split: str = "trainval") -> Path:
    base = devkit / f"VOC{year}"
    for k, (name, (w, h, objects)) in enumerate(VOC_IMAGES.items()):
        _jpeg(base / "JPEGImages" / f"{name}.jpg", w, h, seed=k)
        xml_objects = "".join(
            VOC_OBJECT.format(cls=c, box=(x1, y1, x2, y2),
                              difficult="" if d is None else f"<difficult>{d}</difficult>")
            for c, x1, y1, x2, y2, d in objects)
        (base / "Annotations").mkdir(parents=True, exist_ok=True)
        (base / "Annotations" / f"{name}.xml").write_text(VOC_XML.format(year=year, name=name, w=w, h=h,
                                                                         objects=xml_objects))
    (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(VOC_IMAGES) + "\n")
    return devkit


@pytest.fixture
def coco(tmp_path) -> Path:
    return write_coco(tmp_path / "coco")


def _coco_set(root: Path, **kwargs) -> CocoDetection:
    return CocoDetection(root / "train2017", root / "annotations" / "instances_train2017.json", **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# COCO


def test_coco_boxes_labels_crowd_and_sizes(coco):
    dataset = _coco_set(coco)
    assert len(dataset) == 3 and dataset.records.image_ids.tolist() == [3, 7, 12]  # sorted by image id
    assert dataset.category_ids == [1, 18, 90] and dataset.class_names == ["person", "dog", "toothbrush"]
    image, target = dataset[1]  # image 7: 40 × 30
    assert image.dtype == torch.float32 and image.shape == (3, 30, 40) and 0 <= image.min() and image.max() <= 1
    assert set(target) == {"boxes", "labels", "iscrowd", "image_id", "orig_size"}
    assert type(target["boxes"]) is torch.Tensor and target["boxes"].dtype == torch.float32
    # xywh → xyxy; dog (18) → 1, person (1) → 0; the zero-width toothbrush is dropped silently
    assert target["boxes"].tolist() == [[5, 6, 15, 14], [0, 0, 20, 20]]
    assert target["labels"].tolist() == [1, 0] and target["labels"].dtype == torch.int64
    assert target["iscrowd"].tolist() == [False, True] and target["iscrowd"].dtype == torch.bool
    assert target["image_id"].dtype == torch.int64 and target["image_id"].shape == () and int(target["image_id"]) == 7
    assert target["orig_size"].tolist() == [30, 40] and target["orig_size"].dtype == torch.int64
    assert dataset.aspect_ratios.tolist() == pytest.approx([30 / 50, 40 / 30, 1.0])  # from the json


def test_coco_box_partly_outside_is_clamped_and_fully_outside_removed(coco):
    _, target = _coco_set(coco)[0]  # image 3: 30 × 50
    assert target["boxes"].tolist() == [[2.5, 3, 12.5, 15], [25, 40, 30, 50]]
    assert target["labels"].tolist() == [2, 0] and target["iscrowd"].tolist() == [False, False]


def test_empty_image_yields_empty_boxes_collates_and_is_skipped_for_training(coco):
    dataset = _coco_set(coco)
    image, target = dataset[2]  # image 12: no annotations, a grayscale file
    assert image.shape == (3, 20, 20) and torch.equal(image[0], image[1])  # grayscale → RGB
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["iscrowd"].shape == (0,)
    images, targets = detection_collate([dataset[1], dataset[2]])
    assert [i.shape for i in images] == [(3, 30, 40), (3, 20, 20)] and targets[1]["boxes"].shape == (0, 4)
    assert _coco_set(coco, skip_empty=True).records.image_ids.tolist() == [3, 7]


@pytest.mark.parametrize("changes, image_id", [
    ({1: {"bbox": [5, 6, 10]}}, 7),
    ({4: {"bbox": [2, 3, -1, 12]}}, 3),
    ({1: {"bbox": [5, float("nan"), 10, 8]}}, 7),
    ({5: {"category_id": 2}}, 3),
    ({6: {"image_id": 999}}, 999),
])
def test_malformed_coco_annotation_names_file_and_image(tmp_path, changes, image_id):
    root = write_coco(tmp_path / "coco", changes)
    with pytest.raises(ValueError, match=rf"instances_train2017\.json'?: image {image_id}\b"):
        _coco_set(root)


def test_corrupt_jpeg_raises_naming_the_file(coco):
    path = coco / "train2017" / f"{7:012d}.jpg"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated
    dataset = _coco_set(coco)
    dataset[0]  # the other images still load
    with pytest.raises(CorruptImageError, match=re.escape(str(path))):
        dataset[1]


# --------------------------------------------------------------------------------------------------------------------
# Transforms


def test_eval_resize_scales_boxes_and_caps_the_longer_side(coco):
    image, target = _coco_set(coco, transform=detection_transform(False, 60, 1000))[1]  # 40 × 30, × 2
    assert image.shape == (3, 60, 80)
    assert target["boxes"].tolist() == [[10, 12, 30, 28], [0, 0, 40, 40]]
    assert target["orig_size"].tolist() == [30, 40]  # the file's size, for rescaling predictions
    image, target = _coco_set(coco, transform=detection_transform(False, 60, 60))[1]  # capped: × 1.5
    assert image.shape == (3, 45, 60)
    assert target["boxes"].tolist() == [[7.5, 9, 22.5, 21], [0, 0, 30, 30]]


def test_multiscale_training_draws_each_size_and_skips_a_no_op_resize(coco):
    dataset = _coco_set(coco, transform=detection_transform(True, [30, 60], 1000, flip_prob=0.0))
    torch.manual_seed(0)
    shapes = {tuple(dataset[1][0].shape) for _ in range(12)}
    assert shapes == {(3, 30, 40), (3, 60, 80)}
    image = tv_tensors.Image(torch.zeros(3, 30, 40, dtype=torch.uint8))
    assert ResizeShortestSide(30, 40)(image) is image  # already the right size: untouched
    assert ResizeShortestSide(30, 30)(image).shape == (3, 23, 30)  # max_size == min_size is allowed (a cap)
    assert ResizeShortestSide(30, 20)(image).shape == (3, 15, 20)


def test_flipped_box_covers_exactly_the_mirrored_pixels():
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    image[:, 4:10, 3:9] = 255  # columns 3..8
    target = {"boxes": tv_tensors.BoundingBoxes([[3, 4, 9, 10]], format="XYXY", canvas_size=(20, 30)),
              "labels": torch.tensor([1]), "iscrowd": torch.tensor([False])}
    out, out_target = detection_transform(True, None, flip_prob=1.0)(tv_tensors.Image(image), target)
    x1, y1, x2, y2 = (int(v) for v in out_target["boxes"][0])
    assert (x1, y1, x2, y2) == (30 - 9, 4, 30 - 3, 10)
    inside = torch.zeros(20, 30, dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    assert bool((out[:, inside] == 1).all()) and bool((out[:, ~inside] == 0).all())


def test_sanitize_filters_labels_and_iscrowd_together():
    target = {"boxes": tv_tensors.BoundingBoxes([[1, 1, 5, 5], [50, 50, 60, 60], [2, 2, 2, 8]], format="XYXY",
                                                canvas_size=(20, 30)),
              "labels": torch.tensor([0, 1, 2]), "iscrowd": torch.tensor([True, False, False])}
    _, out = detection_transform(False)(tv_tensors.Image(torch.zeros(3, 20, 30, dtype=torch.uint8)), target)
    assert out["boxes"].tolist() == [[1, 1, 5, 5]]
    assert out["labels"].tolist() == [0] and out["iscrowd"].tolist() == [True]


# --------------------------------------------------------------------------------------------------------------------
# VOC


def test_voc_one_based_boxes_difficult_and_concatenated_sets(tmp_path):
    devkit = write_voc(tmp_path / "VOCdevkit")
    write_voc(devkit, year="2012")
    dataset = VOCDetection(devkit, ["2007/trainval", "2012/trainval"])
    assert len(dataset) == 4 and dataset.ids[2] == ("2012", "000005") and dataset.class_names == list(VOC_CLASSES)
    image, target = dataset[0]
    assert image.shape == (3, 40, 50) and target["orig_size"].tolist() == [40, 50]
    assert target["boxes"].tolist() == [[9, 19, 29, 34], [0, 0, 49, 39]]  # x - 1: py-faster-rcnn convention
    assert target["labels"].tolist() == [VOC_CLASSES.index("chair"), VOC_CLASSES.index("person")] == [8, 14]
    assert target["iscrowd"].tolist() == [False, True]  # difficult=1
    _, target = dataset[3]
    assert target["boxes"].tolist() == [[4, 5, 24, 49]] and target["labels"].tolist() == [6]
    assert target["iscrowd"].tolist() == [False] and int(target["image_id"]) == 3  # the index in the concatenation
    assert dataset.aspect_ratios.tolist() == pytest.approx([50 / 40, 30 / 60] * 2)


@pytest.mark.parametrize("xml, message", [
    ("<annotation><size><width>9</width><height>9</height></size><object><name>chair</name></object></annotation>",
     "bndbox"),
    ("<annotation><object><name>unicorn</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax>"
     "</bndbox></object></annotation>", "unicorn"),
    ("<annotation><object><name>chair", "cannot parse"),
])
def test_malformed_voc_xml_names_the_file(tmp_path, xml, message):
    devkit = write_voc(tmp_path / "VOCdevkit")
    (devkit / "VOC2007" / "Annotations" / "000007.xml").write_text(xml)
    with pytest.raises(ValueError, match=rf"000007\.xml.*{message}"):
        VOCDetection(devkit, "2007/trainval")


# --------------------------------------------------------------------------------------------------------------------
# Missing data


def test_missing_coco_names_the_layout_and_source(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"(?s)nowhere.*annotations/instances_train2017\.json.*cocodataset"):
        CocoDetectionDataModule(root=str(tmp_path / "nowhere")).setup("fit")


def test_missing_voc_names_the_layout_and_source(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"(?s)ImageSets/Main/trainval\.txt.*host\.robots\.ox\.ac\.uk"):
        VOCDetectionDataModule(root=str(tmp_path / "VOCdevkit")).setup("fit")
    devkit = write_voc(tmp_path / "VOCdevkit")  # 2007 only: the 2012 split is missing
    with pytest.raises(DatasetNotFoundError, match=r"VOC2012"):
        VOCDetectionDataModule(root=str(devkit)).setup("fit")


# --------------------------------------------------------------------------------------------------------------------
# Aspect-ratio batches and DDP sharding


RATIOS = torch.tensor([1.5, 0.7, 1.0, 0.5, 2.0, 0.8, 1.3, 0.6, 1.1, 0.9, 1.7])  # 6 landscape (≥ 1), 5 portrait


def test_batches_never_mix_orientations_and_cover_the_data():
    sampler = AspectRatioBatchSampler(RATIOS, batch_size=2, seed=1)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 3 + 3
        assert sorted(i for b in batches for i in b) == list(range(len(RATIOS)))
        for batch in batches:
            assert 1 <= len(batch) <= 2 and len({bool(RATIOS[i] >= 1) for i in batch}) == 1


def test_ddp_shares_are_disjoint_equal_in_steps_and_cover_the_data():
    for batch_size, world in ((2, 2), (3, 2), (2, 4), (4, 3)):
        shares = [list(AspectRatioBatchSampler(RATIOS, batch_size, seed=3, rank=r, world_size=world))
                  for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # every rank runs the same number of steps
        assert all(len(s) == len(AspectRatioBatchSampler(RATIOS, batch_size, rank=r, world_size=world))
                   for r, s in enumerate(shares))
        items = [i for share in shares for batch in share for i in batch]
        assert sorted(items) == list(range(len(RATIOS)))  # disjoint and covering
        assert all(len({bool(RATIOS[i] >= 1) for i in b}) == 1 for share in shares for b in share)


def test_set_epoch_reshuffles_deterministically_and_lightning_reaches_it():
    def batches(epoch, seed=0):
        sampler = AspectRatioBatchSampler(RATIOS, 2, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert batches(0) == batches(0) and batches(1) == batches(1)
    assert batches(0) != batches(1) and batches(0) != batches(0, seed=1)
    sampler = AspectRatioBatchSampler(RATIOS, 2)
    loader = DataLoader(list(range(len(RATIOS))), batch_sampler=sampler)
    _set_sampler_epoch(loader, 5)  # what Lightning's fit loop calls every epoch
    assert sampler.epoch == 5 and list(loader.batch_sampler) == batches(5)


def test_coco_datamodule_trains_on_annotated_images_and_shards_under_ddp(coco):
    dm = CocoDetectionDataModule(root=str(coco), train_min_size=[30, 40], min_size=30, max_size=100, batch_size=1)
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.class_names == ["person", "dog", "toothbrush"] and dm.category_ids == [1, 18, 90]
    assert len(dm.train_set) == 2 and len(dm.val_set) == 3  # training skips the empty image, validation keeps it
    images, targets = next(iter(dm.val_dataloader()))
    assert isinstance(images, list) and images[0].shape == (3, 50, 30) and targets[0]["orig_size"].tolist() == [50, 30]
    assert torch.equal(dm.denormalize(images[0][None]), images[0][None])  # already in [0, 1]
    shares, evaluated = [], []
    for rank in range(2):
        dm._world = lambda rank=rank: (rank, 2)
        shares.append([int(t["image_id"]) for _, ts in dm.train_dataloader() for t in ts])
        evaluated.append([int(t["image_id"]) for _, ts in dm.val_dataloader() for t in ts])
    assert sorted(shares[0] + shares[1]) == [3, 7] and len(shares[0]) == len(shares[1]) == 1
    assert evaluated == [[3, 12], [7]]  # strided, every image once


# --------------------------------------------------------------------------------------------------------------------
# Digits on canvas

SMALL = dict(num_train=24, num_val=8, num_test=8)


def _annotations(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_digit_canvas_is_deterministic_and_regenerated_when_parameters_change(tmp_path):
    a, b = write_digit_canvas(tmp_path / "a", **SMALL), write_digit_canvas(tmp_path / "b", **SMALL)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 24 + 8 + 8 + 3 + 1
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    before = (a / "val" / "000000.png").read_bytes()
    write_digit_canvas(a, **SMALL, noise=0.1)
    assert json.loads((a / "generated.json").read_text())["params"]["noise"] == 0.1
    assert (a / "val" / "000000.png").read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="not a 'detection_digit_canvas' set"):
        write_digit_canvas(tmp_path / "mine", **SMALL)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["precious.txt"]


def test_concurrent_writers_leave_one_complete_set(tmp_path):
    errors = []

    def write():
        try:
            write_digit_canvas(tmp_path / "shared", **SMALL)
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=write) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    reference = write_digit_canvas(tmp_path / "reference", **SMALL)
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "shared") for p in (tmp_path / "shared").rglob("*") if p.is_file())
    assert all((reference / f).read_bytes() == (tmp_path / "shared" / f).read_bytes() for f in files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_digit_canvas_boxes_overlap_brightness_and_held_out_writers(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = write_digit_canvas(tmp_path / "canvas", **SMALL)
    pools = {"train": (0, 1400), "val": (1400, 1600), "test": (1600, len(digits.images))}
    for split, (lo, hi) in pools.items():
        coco = _annotations(root, split)
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        assert [c["name"] for c in coco["categories"]] == [str(d) for d in range(10)]
        by_image = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        assert len(by_image) == len(coco["images"])  # 1..max_digits digits on every canvas
        for entry in coco["images"]:
            pixels = np.asarray(Image.open(root / split / entry["file_name"]), dtype=np.float64) / 255
            assert pixels.shape == (128, 128)
            anns = by_image[entry["id"]]
            assert 1 <= len(anns) <= 4
            boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
            assert (boxes >= 0).all() and (boxes <= 128).all()
            assert all(16 <= a["bbox"][2] == a["bbox"][3] <= 40 and a["iscrowd"] == 0 for a in anns)
            for i in range(len(boxes)):
                for j in range(i):
                    lt, rb = np.maximum(boxes[i, :2], boxes[j, :2]), np.minimum(boxes[i, 2:], boxes[j, 2:])
                    inter = np.prod(np.clip(rb - lt, 0, None))
                    union = np.prod(boxes[i, 2:] - boxes[i, :2]) + np.prod(boxes[j, 2:] - boxes[j, :2]) - inter
                    assert inter / union < 0.05
            background = np.ones((128, 128), dtype=bool)
            for x1, y1, x2, y2 in boxes.astype(int):
                background[y1:y2, x1:x2] = False
            assert pixels[background].max() < 0.3 + 1 / 255  # uniform noise in [0, 0.3)
            noise_level = pixels[background].mean()  # ≈ 0.15
            for ann in anns:
                x, y, s, _ = ann["bbox"]
                index = ann["digit_index"]
                assert lo <= index < hi  # val/test digits come from writers never seen in training
                assert ann["category_id"] == int(digits.target[index]) + 1
                region = pixels[y:y + s, x:x + s]
                assert region.mean() > noise_level + 0.07  # the digit brightens its box (≥ +0.13 in the default set)
                # the pasted digit really is that index: max-blending keeps it under the region
                assert (region * 255 >= np.round(resize_digit(digits.images[index] / 16, s) * 255) - 1e-6).all()


def test_digit_canvas_datamodule_reads_the_set_through_coco(tmp_path):
    dm = DigitCanvasDataModule(root=str(tmp_path / "canvas"), batch_size=5, **SMALL)
    dm.setup()
    assert dm.num_classes == 10 and dm.class_names == [str(d) for d in range(10)]
    assert isinstance(dm.train_set, CocoDetection) and dm.train_set.category_ids == list(range(1, 11))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 8, 8)
    batches = list(dm.train_dataloader())
    assert [len(images) for images, _ in batches] == [5, 5, 5, 5, 4]
    images, targets = batches[0]
    assert all(i.shape == (3, 128, 128) and i.dtype == torch.float32 for i in images)  # no resize by default
    assert all(0 <= int(t["labels"].min()) and int(t["labels"].max()) <= 9 for t in targets)
    coco = _annotations(tmp_path / "canvas", "val")
    _, target = dm.val_set[0]
    expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in coco["annotations"] if a["image_id"] == 0)]
    assert target["boxes"].tolist() == expected
