"""Fine-grained datamodules on tiny trees written in the real release formats (CUB, NABirds, Aircraft, Cars)."""

import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from datamodules.base import CorruptImageError, DatasetNotFoundError
from datamodules.classification import IMAGENET_MEAN, IMAGENET_STD

if not (Path(__file__).resolve().parents[1] / "datamodules" / "sampler.py").exists():
    pytest.skip("datamodules/sampler.py (BalancedClassSampler) is not there yet", allow_module_level=True)

import datamodules.finegrained as fg  # noqa: E402

SMALL = dict(image_size=16, resize=20, batch_size=4, num_workers=0)
RED, BLUE, WHITE = (220, 20, 20), (20, 20, 220), (255, 255, 255)
BOX = (10, 5, 20, 15)  # x, y, w, h of the blue object in every written image


def _jpeg(path: Path, size=(48, 36), box=BOX, banner: int = 0) -> None:
    """A red image with a blue box at ``box`` (0-based x, y, w, h) and an optional white banner at the bottom."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = RED
    x, y, w, h = box
    pixels[y : y + h, x : x + w] = BLUE
    if banner:
        pixels[-banner:] = WHITE
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95, subsampling=0)  # sharp colour edges


def _lines(path: Path, rows) -> None:
    path.write_text("".join(" ".join(str(v) for v in row) + "\n" for row in rows))


# ---- writers in the release formats ----

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def write_cub(root: Path, train_per_class=(4, 4, 4), test_per_class=(2, 2, 2)) -> Path:
    """``CUB_200_2011/`` with images.txt listed class 3 first, so label order ≠ order of appearance."""
    folder = root / "CUB_200_2011"
    entries = []  # (class_id, relpath, is_train)
    for c in reversed(range(len(CUB_CLASSES))):
        name = CUB_CLASSES[c]
        for i in range(train_per_class[c] + test_per_class[c]):
            rel = f"{name}/{name.split('.')[1]}_{i:04d}_{c}.jpg"
            _jpeg(folder / "images" / rel)
            entries.append((c + 1, rel, int(i < train_per_class[c])))
    ids = range(1, len(entries) + 1)
    _lines(folder / "images.txt", [(i, rel) for i, (_, rel, _) in zip(ids, entries)])
    _lines(folder / "image_class_labels.txt", [(i, c) for i, (c, _, _) in zip(ids, entries)])
    _lines(folder / "train_test_split.txt", [(i, t) for i, (_, _, t) in zip(ids, entries)])
    _lines(folder / "classes.txt", [(c + 1, name) for c, name in enumerate(CUB_CLASSES)])
    _lines(folder / "bounding_boxes.txt", [(i, *(f"{v:.1f}" for v in BOX)) for i in ids])
    return folder


NABIRDS_CLASSES = {0: "Birds", 1: "Perching Birds", 295: "Mallard (Female/Juvenile)", 400: "Bald Eagle (Adult)",
                   817: "Common Loon (Breeding)", 999: "Unused Leaf"}
NABIRDS_PARENTS = {1: 0, 295: 1, 400: 1, 817: 1, 999: 1}


def write_nabirds(root: Path, per_class=3) -> Path:
    folder = root / "nabirds"
    rows = []  # (uuid, relpath, class_id, is_train)
    rng = np.random.default_rng(0)
    for class_id in (817, 295, 400):
        for i in range(per_class):
            image_id = str(uuid.UUID(bytes=rng.bytes(16)))
            rel = f"{class_id:04d}/{image_id.replace('-', '')}.jpg"
            _jpeg(folder / "images" / rel)
            rows.append((image_id, rel, class_id, int(i < per_class - 1)))
    _lines(folder / "images.txt", [(u, rel) for u, rel, _, _ in rows])
    _lines(folder / "image_class_labels.txt", [(u, c) for u, _, c, _ in rows])
    _lines(folder / "train_test_split.txt", [(u, t) for u, _, _, t in rows])
    _lines(folder / "classes.txt", sorted(NABIRDS_CLASSES.items()))
    _lines(folder / "hierarchy.txt", sorted(NABIRDS_PARENTS.items()))
    _lines(folder / "bounding_boxes.txt", [(u, *BOX) for u, _, _, _ in rows])
    return folder


AIRCRAFT_VARIANTS = ["Falcon 2000", "Cessna 172", "F-16A/B"]  # the file order, not alphabetical
AIRCRAFT_FAMILY = {"Falcon 2000": "Dassault Falcon", "Cessna 172": "Cessna 172", "F-16A/B": "F-16"}
AIRCRAFT_SPLITS = {"train": 2, "val": 1, "test": 2}
BANNER = 20


def write_aircraft(root: Path) -> Path:
    data = root / "fgvc-aircraft-2013b" / "data"
    number, split_rows, boxes = 34300, {s: [] for s in AIRCRAFT_SPLITS}, []
    for variant in AIRCRAFT_VARIANTS:
        for split, n in AIRCRAFT_SPLITS.items():
            for _ in range(n):
                image_id = f"{number:07d}"  # seven digits with leading zeros, as in the release
                number += 1
                _jpeg(data / "images" / f"{image_id}.jpg", size=(48, 36 + BANNER), banner=BANNER)
                split_rows[split].append((image_id, variant))
                x, y, w, h = BOX
                boxes.append((image_id, x + 1, y + 1, x + w, y + h))  # 1-based inclusive corners
    for level, to_name in (("variant", lambda v: v), ("family", AIRCRAFT_FAMILY.get)):
        for split, rows in split_rows.items():
            _lines(data / f"images_{level}_{split}.txt", [(i, to_name(v)) for i, v in rows])
        _lines(data / f"images_{level}_trainval.txt", [(i, to_name(v)) for i, v in split_rows["train"] + split_rows["val"]])
    (data / "variants.txt").write_text("\n".join(AIRCRAFT_VARIANTS) + "\n")
    (data / "families.txt").write_text("\n".join(dict.fromkeys(AIRCRAFT_FAMILY.values())) + "\n")
    _lines(data / "images_box.txt", boxes)
    return data


CARS_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TTS Coupe 2012"]


def _cars_annotations(rows) -> np.ndarray:
    dtype = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    return np.array([tuple(r) for r in rows], dtype=dtype).reshape(1, -1)  # MATLAB's 1×N struct array


def write_cars(root: Path, train=(3, 2, 4), test=(1, 2, 1)) -> Path:
    from scipy.io import savemat

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    x, y, w, h = BOX
    corners = (x + 1, y + 1, x + w, y + h)  # MATLAB 1-based inclusive
    for split, counts, mat in (("train", train, base / "devkit" / "cars_train_annos.mat"),
                               ("test", test, base / "cars_test_annos_withlabels.mat")):
        rows, number = [], 1
        for c, n in reversed(list(enumerate(counts))):
            for _ in range(n):
                fname = f"{number:05d}.jpg"
                _jpeg(base / f"cars_{split}" / fname)
                rows.append((*(np.uint16(v) for v in corners), np.uint8(c + 1), fname))
                number += 1
        savemat(str(mat), {"annotations": _cars_annotations(rows)})
    savemat(str(base / "devkit" / "cars_meta.mat"), {"class_names": np.array(CARS_CLASSES, dtype=object).reshape(1, -1)})
    return base


# ---- helpers ----


def _folder_labels(dataset, class_names, folder_name):
    """(label the module gives, label expected from the file's class folder) for every item."""
    return [(int(label), class_names.index(folder_name(f))) for f, label in zip(dataset.files, dataset.labels)]


def _mean_rgb(tensor: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor * std + mean).mean(dim=(1, 2)).numpy() * 255


# ---- CUB ----


@pytest.mark.parametrize("level", ["parent", "folder"])
def test_cub_reads_release_format_with_0_based_labels(tmp_path, level):
    folder = write_cub(tmp_path, train_per_class=(4, 3, 5), test_per_class=(2, 1, 3))
    dm = fg.CUBDataModule(root=str(tmp_path if level == "parent" else folder), **SMALL)
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.class_names == CUB_CLASSES
    assert len(dm.train_set) == 12 and len(dm.test_set) == 6
    assert dm.val_set is dm.test_set  # val_fraction=0: validate on the test split
    for dataset, per_class in ((dm.train_set, [4, 3, 5]), (dm.test_set, [2, 1, 3])):
        pairs = _folder_labels(dataset, CUB_CLASSES, lambda f: f.parent.name)
        assert all(got == want for got, want in pairs)
        assert np.bincount(dataset.labels.numpy()).tolist() == per_class
    # train_test_split.txt decides the split: image index i < per-class train count is a training image
    assert all(int(f.stem.split("_")[-2]) < [4, 3, 5][int(f.stem[-1])] for f in dm.train_set.files)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert dm.mean == IMAGENET_MEAN and dm.std == IMAGENET_STD


def test_eval_transform_is_square_resize_then_center_crop(tmp_path):
    write_cub(tmp_path)
    dm = fg.CUBDataModule(root=str(tmp_path), image_size=16, resize=24, num_workers=0)
    dm.setup("test")
    image, _ = dm.test_set[0]
    expected = v2.functional.center_crop(v2.functional.resize(dm.test_set.load(0), [24, 24], antialias=True), [16, 16])
    expected = v2.functional.normalize(v2.functional.pil_to_tensor(expected).float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    assert image.shape == (3, 16, 16)
    torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(dm.test_set[0][0], image)  # deterministic
    train_image, _ = dm.train_set[0]
    assert train_image.shape == (3, 16, 16)
    steps = [type(t).__name__ for t in dm.train_transform().transforms]
    assert steps[:3] == ["Resize", "RandomCrop", "RandomHorizontalFlip"]
    assert "RandomHorizontalFlip" not in [type(t).__name__ for t in
                                         fg.CUBDataModule(root=str(tmp_path), hflip=False).train_transform().transforms]


def test_cub_crop_to_box_crops_before_resize(tmp_path):
    write_cub(tmp_path)
    plain = fg.CUBDataModule(root=str(tmp_path), **SMALL)
    plain.setup("test")
    boxed = fg.CUBDataModule(root=str(tmp_path), crop_to_box=True, **SMALL)
    boxed.setup("test")
    assert plain.test_set.load(0).size == (48, 36)
    assert boxed.test_set.load(0).size == (20, 15)  # w, h of bounding_boxes.txt
    plain_rgb, boxed_rgb = _mean_rgb(plain.test_set[0][0]), _mean_rgb(boxed.test_set[0][0])
    assert plain_rgb[0] > plain_rgb[2]  # mostly red background
    assert boxed_rgb[2] > 150 and boxed_rgb[0] < 60  # only the blue object is left


def test_cub_bounding_boxes_needed_only_for_crop_to_box(tmp_path):
    folder = write_cub(tmp_path)
    (folder / "bounding_boxes.txt").unlink()
    fg.CUBDataModule(root=str(tmp_path), **SMALL).setup("fit")
    with pytest.raises(DatasetNotFoundError, match="bounding_boxes.txt"):
        fg.CUBDataModule(root=str(tmp_path), crop_to_box=True, **SMALL).setup("fit")


@pytest.mark.parametrize("name", ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"])
def test_cub_missing_metadata_file_is_named(tmp_path, name):
    folder = write_cub(tmp_path)
    (folder / name).unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        fg.CUBDataModule(root=str(tmp_path), **SMALL).setup("fit")
    assert name in str(err.value) and "images.txt" in str(err.value)  # the file, then the layout


def test_cub_label_outside_classes_txt_is_an_error(tmp_path):
    folder = write_cub(tmp_path)
    rows = (folder / "image_class_labels.txt").read_text().splitlines()
    rows[3] = rows[3].split()[0] + " 7"
    (folder / "image_class_labels.txt").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="class id 7.*classes.txt"):
        fg.CUBDataModule(root=str(tmp_path), **SMALL).setup("fit")


def test_cub_image_without_split_entry_is_an_error(tmp_path):
    folder = write_cub(tmp_path)
    rows = (folder / "train_test_split.txt").read_text().splitlines()
    (folder / "train_test_split.txt").write_text("\n".join(rows[1:]) + "\n")
    with pytest.raises(ValueError, match="train_test_split.txt.*image id 1"):
        fg.CUBDataModule(root=str(tmp_path), **SMALL).setup("fit")


def test_listed_image_missing_on_disk_is_named(tmp_path):
    folder = write_cub(tmp_path)
    victim = next((folder / "images" / CUB_CLASSES[1]).glob("*.jpg"))
    victim.unlink()
    with pytest.raises(DatasetNotFoundError, match=victim.name):
        fg.CUBDataModule(root=str(tmp_path), **SMALL).setup("fit")


@pytest.mark.parametrize("module, expected", [
    ("CUBDataModule", "CUB_200_2011/"),
    ("NABirdsDataModule", "hierarchy.txt"),
    ("FGVCAircraftDataModule", "fgvc-aircraft-2013b/data/"),
    ("StanfordCarsDataModule", "cars_test_annos_withlabels.mat"),
])
def test_missing_root_names_path_and_layout(tmp_path, module, expected):
    dm = getattr(fg, module)(root=str(tmp_path / "nowhere"), **SMALL)
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "nowhere" in message and expected in message and "How to get it" in message


def test_corrupt_jpeg_raises_naming_the_file(tmp_path):
    folder = write_cub(tmp_path)
    rel = (folder / "images.txt").read_text().split()[1]
    (folder / "images" / rel).write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    dm = fg.CUBDataModule(root=str(tmp_path), **SMALL)
    dm.setup("fit")
    index = [f.name for f in dm.train_set.files].index(Path(rel).name)
    with pytest.raises(CorruptImageError, match=Path(rel).name):
        dm.train_set[index]


# ---- splits and loaders ----


def test_balanced_loader_gives_p_classes_by_k_images(tmp_path):
    write_cub(tmp_path, train_per_class=(6, 7, 6), test_per_class=(1, 1, 1))
    dm = fg.CUBDataModule(root=str(tmp_path), classes_per_batch=2, images_per_class=3, **SMALL)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, fg.BalancedClassSampler)
    batches = list(loader)
    assert len(batches) == len(loader.batch_sampler) == 19 // 6
    for images, labels in batches:
        assert images.shape == (6, 3, 16, 16)
        classes, counts = labels.unique(return_counts=True)
        assert len(classes) == 2 and counts.tolist() == [3, 3]
    shuffled = fg.CUBDataModule(root=str(tmp_path), **SMALL)
    shuffled.setup("fit")
    assert next(iter(shuffled.train_dataloader()))[0].shape[0] == 4  # batch_size without classes_per_batch


def test_balanced_sampler_under_ddp_needs_use_distributed_sampler_false(tmp_path):
    write_cub(tmp_path)
    dm = fg.CUBDataModule(root=str(tmp_path), classes_per_batch=2, **SMALL)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, current_epoch=0,
                                 _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
    for loader in (dm.train_dataloader, dm.val_dataloader):
        with pytest.raises(RuntimeError, match="use_distributed_sampler: false"):
            loader()


def test_val_fraction_holds_out_per_class_disjoint_and_seeded(tmp_path):
    write_cub(tmp_path, train_per_class=(8, 8, 12), test_per_class=(1, 1, 1))

    def split(seed):
        dm = fg.CUBDataModule(root=str(tmp_path), val_fraction=0.25, seed=seed, **SMALL)
        dm.setup("fit")
        return dm

    dm = split(0)
    train, val = set(dm.train_set.files), set(dm.val_set.files)
    assert not train & val and len(train | val) == 28
    assert np.bincount(dm.val_set.labels.numpy()).tolist() == [2, 2, 3]
    assert all(got == want for got, want in _folder_labels(dm.val_set, CUB_CLASSES, lambda f: f.parent.name))
    assert dm.val_set is not dm.test_set and len(dm.test_set) == 3
    torch.testing.assert_close(dm.val_set[0][0], dm.val_set[0][0])  # evaluation transform: no randomness
    assert set(split(0).val_set.files) == val and set(split(1).val_set.files) != val
    for seed in (1, 2, 3):  # exactly round(25 %) of every class for any seed, not about 25 % overall
        assert np.bincount(split(seed).val_set.labels.numpy()).tolist() == [2, 2, 3]


# ---- NABirds ----


def test_nabirds_sparse_class_ids_are_relabelled(tmp_path):
    write_nabirds(tmp_path, per_class=3)
    dm = fg.NABirdsDataModule(root=str(tmp_path), **SMALL)
    dm.setup("fit")
    # only leaves with images, in class-id order; inner nodes (0, 1) and the empty leaf (999) are dropped
    assert dm.class_ids == [295, 400, 817] and dm.num_classes == 3
    assert dm.class_names == [NABIRDS_CLASSES[c] for c in (295, 400, 817)]
    assert len(dm.train_set) == 6 and len(dm.test_set) == 3
    for dataset in (dm.train_set, dm.test_set):
        assert all(dm.class_ids[int(label)] == int(f.parent.name) for f, label in zip(dataset.files, dataset.labels))
    boxed = fg.NABirdsDataModule(root=str(tmp_path / "nabirds"), crop_to_box=True, **SMALL)
    boxed.setup("fit")
    assert boxed.train_set.load(0).size == (20, 15)


# ---- FGVC-Aircraft ----


@pytest.mark.parametrize("level", ["root", "dataset", "data"])
def test_aircraft_variants_with_spaces_and_banner(tmp_path, level):
    data = write_aircraft(tmp_path)
    root = {"root": tmp_path, "dataset": data.parent, "data": data}[level]
    dm = fg.FGVCAircraftDataModule(root=str(root), **SMALL)
    dm.setup("fit")
    assert dm.class_names == AIRCRAFT_VARIANTS and dm.num_classes == 3
    assert len(dm.train_set) == 9 and len(dm.test_set) == 6 and dm.val_set is dm.test_set  # trainval: 3 × (2 + 1)
    rows = dict(line.split(" ", 1) for line in (data / "images_variant_trainval.txt").read_text().splitlines())
    assert all(dm.class_names[int(label)] == rows[f.stem] for f, label in zip(dm.train_set.files, dm.train_set.labels))
    image = dm.train_set.load(0)
    assert image.size == (48, 36)  # the 20-pixel banner is gone
    assert np.asarray(image).min(axis=2).max() < 200  # no white row left
    full = fg.FGVCAircraftDataModule(root=str(root), crop_bottom=0, **SMALL)
    full.setup("fit")
    assert full.train_set.load(0).size == (48, 36 + BANNER)


def test_aircraft_train_split_uses_official_val_and_family_level(tmp_path):
    write_aircraft(tmp_path)
    dm = fg.FGVCAircraftDataModule(root=str(tmp_path), train_split="train", **SMALL)
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.val_set) == 3 and len(dm.test_set) == 6
    assert not set(dm.train_set.files) & set(dm.val_set.files)
    family = fg.FGVCAircraftDataModule(root=str(tmp_path), annotation_level="family", **SMALL)
    family.setup("fit")
    assert family.class_names == ["Dassault Falcon", "Cessna 172", "F-16"]
    variant = fg.FGVCAircraftDataModule(root=str(tmp_path), **SMALL)
    variant.setup("fit")
    assert family.train_set.labels.tolist() == variant.train_set.labels.tolist()  # one family per variant here
    with pytest.raises(DatasetNotFoundError, match="manufacturers.txt"):
        fg.FGVCAircraftDataModule(root=str(tmp_path), annotation_level="manufacturer", **SMALL).setup("fit")


def test_aircraft_box_is_1_based_and_unknown_variant_is_an_error(tmp_path):
    data = write_aircraft(tmp_path)
    dm = fg.FGVCAircraftDataModule(root=str(tmp_path), crop_to_box=True, **SMALL)
    dm.setup("fit")
    x, y, w, h = BOX
    raw = np.asarray(Image.open(dm.train_set.files[0]).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(dm.train_set.load(0)), raw[y : y + h, x : x + w])  # exactly the box
    (data / "variants.txt").write_text("Falcon 2000\nCessna 172\n")
    with pytest.raises(ValueError, match="'F-16A/B'.*variants.txt"):
        fg.FGVCAircraftDataModule(root=str(tmp_path), **SMALL).setup("fit")


# ---- Stanford Cars ----


@pytest.mark.parametrize("nested", [True, False])
def test_stanford_cars_reads_mat_annotations(tmp_path, nested):
    base = write_cars(tmp_path)
    dm = fg.StanfordCarsDataModule(root=str(tmp_path if nested else base), **SMALL)
    dm.setup("fit")
    assert dm.class_names == CARS_CLASSES and dm.num_classes == 3
    assert np.bincount(dm.train_set.labels.numpy()).tolist() == [3, 2, 4]
    assert np.bincount(dm.test_set.labels.numpy()).tolist() == [1, 2, 1]
    assert all(f.parent.name == "cars_test" for f in dm.test_set.files)
    # written in reverse class order: the first file of each split has class 3 (label 2)
    assert int(dm.train_set.labels[0]) == 2 and dm.train_set.files[0].name == "00001.jpg"
    boxed = fg.StanfordCarsDataModule(root=str(base), crop_to_box=True, **SMALL)
    boxed.setup("fit")
    x, y, w, h = BOX
    raw = np.asarray(Image.open(boxed.test_set.files[0]).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(boxed.test_set.load(0)), raw[y : y + h, x : x + w])  # 1-based corners


def test_stanford_cars_single_annotation_and_unlabelled_test_file(tmp_path):
    from scipy.io import savemat

    base = write_cars(tmp_path, train=(1, 0, 0), test=(0, 1, 0))  # squeeze_me turns 1-element arrays into scalars
    dm = fg.StanfordCarsDataModule(root=str(base), **SMALL)
    with pytest.warns(UserWarning, match="2 classes have no training image"):
        dm.setup("fit")
    assert dm.train_set.labels.tolist() == [0] and dm.test_set.labels.tolist() == [1]
    unlabelled = np.array([(1, 1, 5, 5, "00001.jpg")], dtype=[(f, "O") for f in
                                                             ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "fname")])
    savemat(str(base / "cars_test_annos_withlabels.mat"), {"annotations": unlabelled.reshape(1, -1)})
    with pytest.raises(ValueError, match=r"\['class'\].*withlabels"):
        fg.StanfordCarsDataModule(root=str(base), **SMALL).setup("fit")
    (base / "devkit" / "cars_meta.mat").unlink()
    with pytest.raises(DatasetNotFoundError, match="cars_meta.mat"):
        fg.StanfordCarsDataModule(root=str(base), **SMALL).setup("fit")
