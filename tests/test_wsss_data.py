"""Weakly supervised segmentation data: the VOC 2012 + SBD reader on tiny trees in the real layout, its errors, the
joint train transform, stage-2 pseudo masks, and the generated digit canvases read back through the same code."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.base import DatasetNotFoundError
from datamodules.digits import load_digit_images, split_indices
from datamodules.generated.wsss_digit_canvas import write_wsss_digit_canvas
from datamodules.wsss import (VOC_CLASSES, VOC_PALETTE, DigitCanvasWSSSDataModule, WSSSDataModule, read_class_labels,
                              read_id_list, read_mask, save_palette_png)

# id -> (height, width, objects of its xml); sizes differ so that a transposed or resized mask cannot pass
OBJECTS = {
    "2007_000032": (30, 40, ["aeroplane", "aeroplane", "person"]),
    "2007_000039": (36, 24, ["tvmonitor"]),
    "2008_000123": (20, 28, ["dog", "cat", "dog"]),
}


def _xml(objects):
    body = "".join(
        f"<object><name>{name}</name><difficult>{int(i == 1)}</difficult>"
        + ("<part><name>head</name></part>" if name == "person" else "")  # a body part is no class
        + "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        for i, name in enumerate(objects))
    return f"<annotation><filename>x.jpg</filename>{body}</annotation>"


def _mask_for(height, width, objects, value_shift=0):
    """Class blocks of the objects' ids with VOC's 255 border around each block."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for k, name in enumerate(sorted(set(objects))):
        c = VOC_CLASSES.index(name) + 1 + value_shift
        top = 2 + 6 * k
        mask[top:top + 6, 3:3 + width // 2] = 255
        mask[top + 1:top + 5, 4:2 + width // 2] = c
    return mask


def voc_tree(root, image_ending=".jpg", lists=None):
    """A tiny VOC2012 + SegmentationClassAug tree in the real layout (no cls_labels.npy: labels from the xml)."""
    for sub in ("JPEGImages", "SegmentationClassAug", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    masks = {}
    for name, (height, width, objects) in OBJECTS.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"{name}{image_ending}")
        masks[name] = _mask_for(height, width, objects)
        save_palette_png(root / "SegmentationClassAug" / f"{name}.png", masks[name])
        (root / "Annotations" / f"{name}.xml").write_text(_xml(objects))
    names = list(OBJECTS)
    for list_name, ids in (lists or {"train_aug": names, "train": names[:2], "val": names[2:]}).items():
        (root / "ImageSets" / "Segmentation" / f"{list_name}.txt").write_text("\n".join(ids) + "\n")
    return masks


def _multi_hot(objects):
    row = np.zeros(len(VOC_CLASSES), dtype=np.float32)
    row[[VOC_CLASSES.index(o) for o in objects]] = 1
    return row


# ---- labels, lists, masks ------------------------------------------------------------------------------------------


def test_labels_from_xml_are_every_object_of_the_image(tmp_path):
    voc_tree(tmp_path)
    labels = read_class_labels(tmp_path, list(OBJECTS), VOC_CLASSES)
    assert labels.dtype == np.float32 and labels.shape == (3, 20)
    expected = np.stack([_multi_hot(objects) for _, _, objects in OBJECTS.values()])
    assert np.array_equal(labels, expected)  # difficult objects count, <part> names do not


@pytest.mark.parametrize("where", ["root", "voc12", "argument", "irn_int_keys"])
def test_labels_from_cls_labels_npy_equal_the_dict_and_win_over_the_xml(tmp_path, where):
    voc_tree(tmp_path / "voc")
    rng = np.random.default_rng(1)
    table = {name: (rng.random(20) < 0.3).astype(np.float32) for name in OBJECTS}
    stored = {int(k.replace("_", "")): v for k, v in table.items()} if where == "irn_int_keys" else table
    path = {"root": tmp_path / "voc" / "cls_labels.npy", "voc12": tmp_path / "voc" / "voc12" / "cls_labels.npy",
            "argument": tmp_path / "elsewhere" / "labels.npy",
            "irn_int_keys": tmp_path / "voc" / "cls_labels.npy"}[where]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, stored, allow_pickle=True)
    ids = ["2008_000123", "2007_000032"]
    labels = read_class_labels(tmp_path / "voc", ids, VOC_CLASSES, str(path) if where == "argument" else None)
    assert np.array_equal(labels, np.stack([table[i] for i in ids]))


def test_cls_labels_without_an_id_names_the_file_and_the_id(tmp_path):
    voc_tree(tmp_path)
    np.save(tmp_path / "cls_labels.npy", {"2007_000032": np.ones(20, np.float32)}, allow_pickle=True)
    with pytest.raises(ValueError, match=r"cls_labels\.npy.*2007_000039"):
        read_class_labels(tmp_path, ["2007_000032", "2007_000039"], VOC_CLASSES)


def test_official_list_lines_give_the_ids(tmp_path):
    path = tmp_path / "train_aug.txt"
    path.write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n2007_000039\n\n")
    assert read_id_list(path) == ["2007_000032", "2007_000039"]


def test_masks_read_back_exactly_with_the_255_border_and_eval_keeps_the_size(tmp_path):
    masks = voc_tree(tmp_path)
    dm = WSSSDataModule(str(tmp_path), pseudo_eval_list="train_aug")
    pseudo_eval, val = dm.evaluation_sets("val")
    assert [len(pseudo_eval), len(val)] == [3, 1]
    for i, name in enumerate(OBJECTS):
        item = pseudo_eval[i]
        assert item["name"] == name and item["index"] == i
        assert item["mask"].dtype == torch.int64 and np.array_equal(item["mask"].numpy(), masks[name])
        assert (item["mask"] == 255).any()
        assert item["image"].shape == (3, *masks[name].shape)  # no geometric change in evaluation
        assert torch.equal(item["labels"], torch.from_numpy(_multi_hot(OBJECTS[name][2])))
    raw = np.asarray(Image.open(tmp_path / "JPEGImages" / "2007_000039.jpg").convert("RGB"), dtype=np.float32) / 255
    image = dm.denormalize(pseudo_eval[1]["image"][None])[0].permute(1, 2, 0).numpy()
    assert np.abs(image - raw).max() < 1e-5  # normalised with ImageNet's mean/std, undone by denormalize
    assert dm.num_classes == 20 and dm.ignore_index == 255 and tuple(VOC_PALETTE[255]) == (224, 224, 192)


def test_palette_png_is_indexed_in_vocs_colours(tmp_path):
    mask = np.array([[0, 1, 15], [20, 255, 7]], dtype=np.uint8)
    save_palette_png(tmp_path / "m.png", mask)
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "P"
        colours = np.asarray(img.convert("RGB"))
    assert np.array_equal(read_mask(tmp_path / "m.png", 20), mask)
    assert colours[0, 1].tolist() == [128, 0, 0] and colours[0, 2].tolist() == [192, 128, 128]  # aeroplane, person
    assert colours[1, 0].tolist() == [0, 64, 128] and colours[1, 1].tolist() == [224, 224, 192]  # tvmonitor, border


# ---- the joint training transform and stage-2 pseudo masks -------------------------------------------------------


def _coded_tree(root, height=20, width=30):
    """Lossless images whose red channel encodes their own mask (red = 12·class + 10), asymmetric so a flip shows."""
    voc_tree(root, lists={"train_aug": ["2007_000032"], "train": ["2007_000032"], "val": ["2007_000032"]})
    (root / "JPEGImages" / "2007_000032.jpg").unlink()
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[2:12, 1:9] = 1
    mask[8:18, 14:28] = 15
    mask[0:5, 20:24] = 5
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0], image[..., 1] = 12 * mask + 10, 77
    Image.fromarray(image).save(root / "JPEGImages" / "2007_000032.png")  # the reader takes .png as well
    pseudo = root / "pseudo"
    pseudo.mkdir()
    save_palette_png(pseudo / "2007_000032.png", mask)
    return mask, pseudo


def test_train_crop_pads_the_mask_with_255_and_keeps_image_and_mask_aligned(tmp_path):
    _, pseudo = _coded_tree(tmp_path)
    dm = WSSSDataModule(str(tmp_path), crop_size=24, resize_long=None, color_jitter=None, hflip=True,
                        pseudo_mask_dir=str(pseudo))
    dm.setup("fit")
    torch.manual_seed(0)
    flips = set()
    for _ in range(12):
        item = dm.train_set[0]
        image, out = item["image"], item["mask"]
        assert image.shape == (3, 24, 24) and out.shape == (24, 24) and out.dtype == torch.int64
        padded = out == 255
        assert padded.sum() == 24 * 24 - 20 * 24  # height 20 → 24: padded; width 30 → 24: cropped
        assert torch.all(image[:, padded] == 0)  # zero padding after normalisation
        red = dm.denormalize(image[None])[0, 0] * 255
        assert torch.equal(((red[~padded] - 10) / 12).round().long(), out[~padded])  # the mask follows the image
        rows = (~padded).any(1).nonzero().squeeze(1)
        flips.add(bool((out[rows[0]:rows[-1] + 1] == 15).nonzero()[:, 1].float().mean() < 12))
    assert flips == {True, False}  # both flipped and unflipped crops, each still aligned


def test_random_resize_long_and_jitter_keep_the_mask_on_the_image(tmp_path):
    _, pseudo = _coded_tree(tmp_path)
    dm = WSSSDataModule(str(tmp_path), crop_size=64, resize_long=(40, 60), color_jitter=None,
                        pseudo_mask_dir=str(pseudo))
    dm.setup("fit")
    torch.manual_seed(1)
    edge_errors = []
    for _ in range(10):
        item = dm.train_set[0]
        valid = item["mask"] != 255
        long_side = max(valid.any(0).sum(), valid.any(1).sum())
        assert 40 <= long_side <= 60  # the image part of the crop: resized so that its long side is in [40, 60]
        red = dm.denormalize(item["image"][None])[0, 0] * 255
        decoded = ((red - 10) / 12).round().long()
        # off the edges (red constant over 3 × 3), where bicubic and nearest agree: a shifted mask would not
        spread = F.max_pool2d(red[None], 3, 1, 1)[0] + F.max_pool2d(-red[None], 3, 1, 1)[0]
        flat = valid & (spread < 3)
        assert flat.sum() > 0.3 * valid.sum()
        assert torch.equal(decoded[flat], item["mask"][flat])
        # and at the edges: class 15 (red 190, among 10 / 22 / 70) is the image above red 100 to within a few pixels;
        # a mask resized by torch's plain NEAREST (floor(i · scale)) sits up to a pixel off the bicubic image
        region = item["mask"] == 15
        edge_errors.append(((red > 100)[valid] != region[valid]).sum().item() / region.sum().item())
    assert max(edge_errors) < 0.03 and np.mean(edge_errors) < 0.015
    jitter = WSSSDataModule(str(tmp_path), crop_size=64, resize_long=None, pseudo_mask_dir=str(pseudo))
    jitter.setup("fit")
    assert set(jitter.train_set[0]["mask"].unique().tolist()) == {0, 1, 5, 15, 255}  # colour jitter leaves masks


def test_training_items_have_no_mask_unless_pseudo_masks_are_given(tmp_path):
    voc_tree(tmp_path)
    dm = WSSSDataModule(str(tmp_path), crop_size=32, batch_size=2)
    dm.setup("fit")
    item = dm.train_set[0]
    assert "mask" not in item and item["image"].shape == (3, 32, 32)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "labels", "index", "name"} and batch["labels"].shape == (2, 20)


def test_pseudo_masks_are_read_per_id_and_a_missing_one_names_the_id(tmp_path):
    masks = voc_tree(tmp_path)
    pseudo = tmp_path / "pseudo"
    pseudo.mkdir()
    for name, mask in masks.items():  # "pseudo" masks unlike the ground truth: class c becomes 21 - c
        save_palette_png(pseudo / f"{name}.png", np.where((mask > 0) & (mask < 255), 21 - mask, mask))
    dm = WSSSDataModule(str(tmp_path), crop_size=40, resize_long=None, hflip=False, color_jitter=None,
                        pseudo_mask_dir=str(pseudo))
    dm.setup("fit")
    item = dm.train_set[1]  # 2007_000039: 36 × 24, padded to 40 × 40
    shown = item["mask"][item["mask"] != 255]
    assert set(shown.unique().tolist()) == {0, 21 - (VOC_CLASSES.index("tvmonitor") + 1)}
    (pseudo / "2007_000039.png").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"pseudo.*2007_000039"):
        WSSSDataModule(str(tmp_path), pseudo_mask_dir=str(pseudo)).setup("fit")


def test_predict_serves_the_predict_split_without_masks(tmp_path):
    voc_tree(tmp_path)
    (tmp_path / "SegmentationClassAug" / "2007_000039.png").unlink()  # predict does not need masks
    dm = WSSSDataModule(str(tmp_path))
    predict = dm.evaluation_sets("predict")
    assert len(predict) == 3 and "mask" not in predict[1]
    assert predict[1]["name"] == "2007_000039" and predict[1]["image"].shape == (3, 36, 24)
    assert set(predict[1]) == {"image", "labels", "index", "name"}


# ---- clear errors ---------------------------------------------------------------------------------------------------


def test_mask_of_another_size_than_its_image_names_the_file(tmp_path):
    voc_tree(tmp_path)
    save_palette_png(tmp_path / "SegmentationClassAug" / "2008_000123.png", np.zeros((28, 20), np.uint8))
    val = WSSSDataModule(str(tmp_path)).evaluation_sets("test")
    with pytest.raises(ValueError, match=r"2008_000123\.png.* is 20×28 .*28×20"):
        val[0]


def test_mask_value_outside_the_classes_names_the_file_and_value(tmp_path):
    voc_tree(tmp_path)
    bad = _mask_for(20, 28, ["dog"])
    bad[5, 5] = 21  # one past tvmonitor: not a class of 20
    save_palette_png(tmp_path / "SegmentationClassAug" / "2008_000123.png", bad)
    val = WSSSDataModule(str(tmp_path)).evaluation_sets("test")
    with pytest.raises(ValueError, match=r"2008_000123\.png.*value 21"):
        val[0]


def test_listed_id_without_image_names_the_list_and_the_id(tmp_path):
    voc_tree(tmp_path, lists={"train_aug": [*OBJECTS, "2011_999999"], "train": ["2007_000032"], "val": ["2007_000039"]})
    with pytest.raises(DatasetNotFoundError, match=r"train_aug\.txt.*'2011_999999'"):
        WSSSDataModule(str(tmp_path)).setup("fit")


def test_missing_root_shows_the_layout_also_for_num_classes(tmp_path):
    dm = WSSSDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match=r"(?s)nowhere.*JPEGImages.*SegmentationClassAug.*train_aug"):
        dm.num_classes
    with pytest.raises(DatasetNotFoundError, match="Expected layout"):
        dm.setup()


def test_evaluation_images_of_varying_size_refuse_batches_of_several(tmp_path):
    voc_tree(tmp_path)
    with pytest.raises(ValueError, match="eval_batch_size=4.*2007_000039"):
        WSSSDataModule(str(tmp_path), eval_batch_size=4).evaluation_sets("val")
    assert len(WSSSDataModule(str(tmp_path), eval_batch_size=1).evaluation_sets("val")) == 2


# ---- the generated digit canvases -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def canvas_root(tmp_path_factory):
    """The default set (2,000 + 500 canvases), generated once for the module."""
    root = tmp_path_factory.mktemp("wsss") / "digits"
    dm = DigitCanvasWSSSDataModule(str(root))
    dm.prepare_data()
    return root


def test_digit_canvases_labels_agree_with_masks_on_every_canvas(canvas_root):
    ids = sorted({*read_id_list(canvas_root / "ImageSets/Segmentation/train_aug.txt"),
                  *read_id_list(canvas_root / "ImageSets/Segmentation/val.txt")})
    labels = read_class_labels(canvas_root, ids, [str(d) for d in range(10)])
    for name, row in zip(ids, labels):
        present = set(np.unique(read_mask(canvas_root / "SegmentationClassAug" / f"{name}.png", 10)).tolist()) - {0}
        assert present == set((np.flatnonzero(row) + 1).tolist()), name
        assert 1 <= row.sum() <= 3


def test_digit_canvases_use_only_their_splits_digits_and_the_mask_rule(canvas_root):
    record = json.loads((canvas_root / "canvases.json").read_text())
    images, digit_labels = load_digit_images(16)
    train, val, test = split_indices(digit_labels.numpy(), 0.1, 0.2, 0)
    assert record["digit_split"]["train"] == train.tolist()
    held_out = set(val.tolist()) | set(test.tolist())
    distractors = 0
    for name, canvas in record["canvases"].items():
        pool = set(train.tolist()) if name.startswith("train_") else held_out
        mask = read_mask(canvas_root / "SegmentationClassAug" / f"{name}.png", 10)
        painted = np.zeros(mask.shape, dtype=bool)
        for paste in canvas["digits"]:
            assert paste["digit_index"] in pool, name
            digit = images[paste["digit_index"], 0].numpy()
            y, x = paste["y"], paste["x"]
            expected = np.where(digit > 0.25 * digit.max(), paste["label"] + 1, 0)
            assert np.array_equal(mask[y:y + 16, x:x + 16], expected), name
            assert not painted[y:y + 16, x:x + 16].any(), "overlapping digits"
            painted[y:y + 16, x:x + 16] = True
        assert not mask[~painted].any()  # nothing else is foreground: the distractor bar is background
        if canvas["distractor"] is not None:
            distractors += 1
            bar = canvas["distractor"]
            image = np.asarray(Image.open(canvas_root / "JPEGImages" / f"{name}.png"))
            region = (slice(bar["y"], bar["y"] + bar["height"]), slice(bar["x"], bar["x"] + bar["width"]))
            assert image[region].min() > 100 and not painted[region].any()
    assert 0.2 < distractors / len(record["canvases"]) < 0.4


def test_digit_canvas_generation_is_deterministic_for_a_seed(tmp_path):
    small = dict(n_train=12, n_train_eval=4, n_val=6)
    a, b, c = (write_wsss_digit_canvas(tmp_path / name, seed=seed, **small)
               for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and len(files) > 40
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "JPEGImages/train_00000.png").read_bytes() != (c / "JPEGImages/train_00000.png").read_bytes()
    assert read_id_list(a / "ImageSets/Segmentation/train.txt") == read_id_list(
        a / "ImageSets/Segmentation/train_aug.txt")[:4]


def test_digit_canvas_datamodule_sets_and_batches(canvas_root, tmp_path):
    dm = DigitCanvasWSSSDataModule(str(canvas_root))
    assert dm.num_classes == 10 and dm.class_names == [str(d) for d in range(10)]
    pseudo_eval, val = dm.evaluation_sets("val")
    assert (len(pseudo_eval), len(val)) == (500, 500)
    assert pseudo_eval.names == read_id_list(canvas_root / "ImageSets/Segmentation/train_aug.txt")[:500]
    assert len(dm.evaluation_sets("test")) == 500
    predict = dm.evaluation_sets("predict")
    assert len(predict) == 2000 and "mask" not in predict[0]
    batch = next(iter(dm.val_dataloader()[1]))
    assert batch["image"].shape == (100, 3, 48, 48) and batch["mask"].shape == (100, 48, 48)
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (32, 3, 48, 48) and "mask" not in train
    # outside a Trainer, setup generates the set itself; num_classes needs no files
    fresh = DigitCanvasWSSSDataModule(str(tmp_path / "new"), n_train=8, n_train_eval=2, n_val=4)
    assert fresh.num_classes == 10 and not (tmp_path / "new").exists()
    fresh.setup("validate")
    assert [len(s) for s in fresh.evaluation_sets("val")] == [2, 4]
    shutil.rmtree(tmp_path / "new")
