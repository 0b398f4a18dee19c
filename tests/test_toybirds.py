"""The toy-bird generator writes CUB-200-2011's exact layout, deterministically, with the class parts drawn."""

import json

import numpy as np
import pytest
from PIL import Image

from datamodules.finegrained import CUBDataModule, ToyBirdsDataModule
from datamodules.generated.finegrained_toybirds import BEAK_COLOURS, TOY_BIRD_CLASSES, write_toy_birds


def _table(folder, name):
    return [line.split() for line in (folder / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def birds(tmp_path_factory):
    return write_toy_birds(tmp_path_factory.mktemp("birds"), train_per_class=3, test_per_class=2, seed=1)


def test_layout_matches_cub(birds):
    images = _table(birds, "images.txt")
    assert len(images) == 12 * 5 and [int(i) for i, _ in images] == list(range(1, 61))
    labels = dict(_table(birds, "image_class_labels.txt"))
    split = dict(_table(birds, "train_test_split.txt"))
    classes = _table(birds, "classes.txt")
    assert [name for _, name in classes] == [f"{i + 1:03d}.{n}" for i, n in enumerate(TOY_BIRD_CLASSES)]
    for image_id, path in images:
        folder = path.split("/")[0]
        assert folder == classes[int(labels[image_id]) - 1][1]  # the folder names the labelled class
        with Image.open(birds / "images" / path) as im:
            assert im.size == (64, 64) and im.format == "JPEG"
    per_class = {}
    for image_id, _ in images:
        per_class.setdefault(labels[image_id], []).append(split[image_id])
    assert all(sorted(v) == ["0", "0", "1", "1", "1"] for v in per_class.values())
    for image_id, *box in _table(birds, "bounding_boxes.txt"):
        x, y, w, h = map(float, box)
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 20 and h > 15


def test_the_cub_parser_reads_it(birds):
    dm = CUBDataModule(root=str(birds.parent), image_size=56, resize=64, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 12 and len(dm.train_set) == 36 and len(dm.test_set) == 24
    image, label = dm.train_set[0]
    assert image.shape == (3, 56, 56) and label == 0


def test_deterministic_and_idempotent(birds, tmp_path):
    again = write_toy_birds(tmp_path / "again", train_per_class=3, test_per_class=2, seed=1)
    for path in sorted(p.relative_to(birds) for p in birds.rglob("*") if p.is_file()):
        assert (birds / path).read_bytes() == (again / path).read_bytes(), path
    marker = tmp_path / "again" / "generated.json"
    stamp = marker.stat().st_mtime_ns
    write_toy_birds(tmp_path / "again", train_per_class=3, test_per_class=2, seed=1)
    assert marker.stat().st_mtime_ns == stamp
    write_toy_birds(tmp_path / "again", train_per_class=3, test_per_class=2, seed=2)
    assert json.loads(marker.read_text())["params"]["seed"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # the old set and the staging folder are gone
    assert (birds / "images.txt").read_text() == (again / "images.txt").read_text()
    first = _table(birds, "images.txt")[0][1]
    assert (birds / "images" / first).read_bytes() != (again / "images" / first).read_bytes()


def test_the_class_beak_colour_is_in_the_image(birds):
    labels = dict(_table(birds, "image_class_labels.txt"))
    colours = np.array(list(BEAK_COLOURS.values()), dtype=np.float32)
    for image_id, path in _table(birds, "images.txt")[::5]:
        pixels = np.asarray(Image.open(birds / "images" / path).convert("RGB"), dtype=np.float32).reshape(-1, 3)
        near = [(np.abs(pixels - c).max(axis=1) < 40).sum() for c in colours]
        beak = TOY_BIRD_CLASSES[int(labels[image_id]) - 1].split("_")[0]
        # the class colour is present; backgrounds are pastel, so the others are (almost) absent
        assert near[list(BEAK_COLOURS).index(beak)] >= 3, (path, near)


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        write_toy_birds(tmp_path, image_size=16)
    with pytest.raises(ValueError, match="per_class"):
        write_toy_birds(tmp_path, train_per_class=0)


def test_datamodule_writes_on_prepare(tmp_path):
    dm = ToyBirdsDataModule(root=str(tmp_path / "tb"), train_per_class=2, test_per_class=1, classes_per_batch=3,
                            images_per_class=2)
    dm.prepare_data()
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (6, 3, 56, 56) and len(set(labels.tolist())) == 3
