"""Unpaired translation data: CycleGAN-layout folders, independent A/B streams, DDP shards, labels, digit domains."""

import collections
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.base import CorruptImageError, DatasetNotFoundError
from datamodules.gan import DigitDomainsDataModule, UnpairedDataModule, UnpairedImageDataset, list_images
from datamodules.generated import gan_digit_domains
from datamodules.generated.gan_digit_domains import render_digit, write_digit_domains


def _write(path: Path, size=(20, 20), seed: int = 0) -> Path:
    """A random RGB image; the format follows the suffix (any case)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    return path


def _unpaired(root: Path, counts=(5, 3, 2, 3), size=(20, 20)) -> Path:
    """``trainA`` / ``trainB`` / ``testA`` / ``testB`` with the given counts, jpg and png mixed."""
    suffixes = (".png", ".JPG", ".jpeg", ".PNG", ".jpg")
    seed = 0
    for split, count in zip(("trainA", "trainB", "testA", "testB"), counts):
        for i in range(count):
            seed += 1
            _write(root / split / f"{split}_{i:02d}{suffixes[i % len(suffixes)]}", size, seed)
    return root


def _dm(root: Path, **kwargs) -> UnpairedDataModule:
    args = dict(image_size=16, load_size=18, num_workers=0, pin_memory=False)
    return UnpairedDataModule(root=str(root), **{**args, **kwargs})


def _batches(loader) -> list:
    """The batches of a ``CombinedLoader`` (its iterator yields ``(batch, batch_idx, dataloader_idx)``)."""
    return [item[0] if isinstance(item, tuple) else item for item in loader]


# -- folders, transforms, errors -------------------------------------------------------------------------------------


def test_mixed_formats_are_listed_and_loaded_into_minus_one_one(tmp_path):
    root = _unpaired(tmp_path)
    (root / "trainA" / "notes.txt").write_text("not an image")
    files = list_images(root / "trainA")
    assert [p.name for p in files] == sorted(f"trainA_{i:02d}{s}" for i, s in
                                             enumerate((".png", ".JPG", ".jpeg", ".PNG", ".jpg")))
    dm = _dm(root)
    dm.setup("fit")
    assert (len(dm.train_a), len(dm.train_b), len(dm.test_a), len(dm.test_b)) == (5, 3, 2, 3)
    for dataset in (dm.train_a, dm.test_b):
        for i in range(len(dataset)):
            image, label, index = dataset[i]
            assert image.shape == (3, 16, 16) and image.dtype == torch.float32
            assert image.min() >= -1 and image.max() <= 1 and image.min() < -0.5 and image.max() > 0.5
            assert label == -1 and index == i
    # the normalisation is undone by the base class's denormalize
    image = dm.test_a[0][0]
    assert torch.allclose(dm.denormalize(image[None])[0], image * 0.5 + 0.5)


def test_eval_resizes_the_whole_image_and_train_crops_a_random_part(tmp_path):
    root = tmp_path / "data"
    left_red = Image.new("RGB", (20, 20))
    left_red.paste((255, 0, 0), (0, 0, 10, 20))
    for split in ("trainA", "trainB", "testA", "testB"):
        (root / split).mkdir(parents=True)
        left_red.save(root / split / "x.png")
    dm = _dm(root, image_size=16, load_size=30, flip=False)
    dm.setup("fit")
    evaluated = dm.test_a[0][0]
    assert evaluated.shape == (3, 16, 16)
    assert evaluated[0, :, :6].mean() > 0.9 and evaluated[0, :, 10:].mean() < -0.9  # the whole image, squashed
    crops = {tuple(dm.train_a[0][0][0, 0].gt(0).tolist()) for _ in range(12)}  # red columns of the first row
    assert len(crops) > 1  # random crop positions


def test_empty_folder_names_the_folder(tmp_path):
    root = _unpaired(tmp_path)
    for path in (root / "trainB").iterdir():
        path.unlink()
    (root / "trainB" / "readme.txt").write_text("images go here")
    with pytest.raises(ValueError, match="trainB"):
        _dm(root).setup("fit")
    with pytest.raises(ValueError, match=str(root / "trainB")):
        list_images(root / "trainB")


def test_missing_folder_gives_the_layout_and_how_to_get_it(tmp_path):
    root = _unpaired(tmp_path)
    for path in (root / "testB").iterdir():
        path.unlink()
    (root / "testB").rmdir()
    with pytest.raises(DatasetNotFoundError) as info:
        _dm(root).setup("test")
    message = str(info.value)
    assert "testB" in message and "<root>/trainA/" in message and "download_cyclegan_dataset.sh" in message
    with pytest.raises(DatasetNotFoundError, match="Expected layout"):
        _dm(tmp_path / "nowhere").setup("fit")


def test_sizes_without_load_size_must_match_and_the_error_names_the_folder(tmp_path):
    root = _unpaired(tmp_path)
    dm = _dm(root, load_size=None)
    dm.setup("fit")  # all 20×20: training crops 16², evaluation keeps the native size
    assert dm.train_a[0][0].shape == (3, 16, 16) and dm.test_a[0][0].shape == (3, 20, 20)
    _write(root / "testB" / "odd.png", size=(20, 24))
    with pytest.raises(ValueError) as info:
        _dm(root, load_size=None).setup("fit")
    message = str(info.value)
    assert str(root / "testB") in message and "odd.png" in message and "20×24" in message and "20×20" in message
    _dm(root).setup("fit")  # with load_size the sizes do not matter
    with pytest.raises(ValueError, match="exceed load_size"):
        UnpairedDataModule(root=str(root), image_size=32, load_size=30)


def test_corrupt_image_names_the_file(tmp_path):
    root = _unpaired(tmp_path)
    bad = root / "trainA" / "trainA_99.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    dm = _dm(root)
    dm.setup("fit")
    index = [p.name for p in dm.train_a.files].index("trainA_99.png")
    with pytest.raises(CorruptImageError, match="trainA_99.png"):
        dm.train_a[index]
    with pytest.raises(CorruptImageError, match="trainA_99.png"):  # the header check of load_size=None
        _dm(root, load_size=None).setup("fit")


def test_labels_file_is_returned_and_a_missing_row_names_the_file(tmp_path):
    root = _unpaired(tmp_path)
    rows = [(split, p.name, 10 * k + i) for k, split in enumerate(("trainA", "trainB", "testA", "testB"))
            for i, p in enumerate(list_images(root / split))]
    with open(root / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("split", "file", "label"), *rows[:-1], ("testB", "not_on_disk.png", 7)])
    with pytest.raises(ValueError, match="testB_02.jpeg"):  # testB's last file has no row; extra rows are fine
        _dm(root, labels_file="labels.csv").setup("test")
    with open(root / "labels.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(rows[-1])
    absolute = _dm(root, labels_file=str(root / "labels.csv"))
    absolute.setup("fit")
    expected = {(split, name): label for split, name, label in rows}
    for split, dataset in (("trainB", absolute.train_b), ("testA", absolute.test_a), ("testB", absolute.test_b)):
        assert [dataset[i][1] for i in range(len(dataset))] == [expected[split, p.name] for p in dataset.files]
    assert absolute.test_b.labels == [30, 31, 32]
    batch = _batches(absolute.train_dataloader())[0]
    assert batch["A"][1].item() in range(5) and batch["B"][1].item() in (10, 11, 12)


# -- training streams and DDP shards ---------------------------------------------------------------------------------


def test_a_and_b_are_shuffled_independently_and_reshuffled_every_epoch(tmp_path):
    root = _unpaired(tmp_path, counts=(12, 12, 1, 1))  # equal sizes: a shared seed would give equal orders
    dm = _dm(root, batch_size=2, seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = _batches(loader)
    assert len(batches) == 12 // 2
    order_a = [i for batch in batches for i in batch["A"][2].tolist()]
    order_b = [i for batch in batches for i in batch["B"][2].tolist()]
    assert sorted(order_a) == sorted(order_b) == list(range(12))  # one pass over each
    assert order_a != order_b and order_a != list(range(12))
    samplers = {key: loader.iterables[key].batch_sampler for key in ("A", "B")}
    for sampler in samplers.values():
        sampler.set_epoch(1)
    next_a, next_b = ([i for batch in samplers[key] for i in batch] for key in ("A", "B"))
    assert next_a != order_a and next_b != order_b and next_a != next_b

    class Trainer:  # what train_dataloader reads of a Trainer in epoch 1 (a resumed run, or reloaded loaders)
        world_size, global_rank, current_epoch = 1, 0, 1

    dm.trainer = Trainer()
    later = _batches(dm.train_dataloader())
    assert [i for batch in later for i in batch["A"][2].tolist()] == next_a


def test_unequal_folders_give_steps_per_epoch_batches_with_b_cycling(tmp_path):
    root = _unpaired(tmp_path, counts=(5, 3, 1, 1))
    dm = _dm(root)
    dm.setup("fit")
    batches = _batches(dm.train_dataloader())
    assert len(batches) == 5  # max(5, 3) // batch_size
    a = [batch["A"][2].item() for batch in batches]
    b = [batch["B"][2].item() for batch in batches]
    assert sorted(a) == [0, 1, 2, 3, 4]
    assert sorted(b[:3]) == [0, 1, 2] and set(b[3:]) <= {0, 1, 2}  # one pass over B, then B starts another
    assert all(batch["A"][0].shape == batch["B"][0].shape == (1, 3, 16, 16) for batch in batches)
    longer = _dm(root, steps_per_epoch=8)
    longer.setup("fit")
    loader = longer.train_dataloader()
    assert [len(loader.iterables[key]) for key in ("A", "B")] == [8, 8] and len(_batches(loader)) == 8


def test_two_ranks_take_disjoint_training_batches_and_split_the_test_sets(tmp_path, monkeypatch):
    root = _unpaired(tmp_path, counts=(8, 6, 5, 4))
    streams, shards = [], []
    for rank in range(2):
        dm = _dm(root, batch_size=2, eval_batch_size=2)
        monkeypatch.setattr(dm, "_world", lambda rank=rank: (rank, 2))
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert [loader.iterables[key].batch_sampler.rank for key in ("A", "B")] == [rank, rank]
        streams.append(_batches(loader))
        shards.append([[i for batch in eval_loader for i in batch[2].tolist()] for eval_loader in dm.val_dataloader()])
    assert len(streams[0]) == len(streams[1]) == 8 // (2 * 2)  # the same number of steps on both ranks
    for step0, step1 in zip(*streams):
        for key in ("A", "B"):
            assert not set(step0[key][2].tolist()) & set(step1[key][2].tolist())  # disjoint within a step
    for domain, size in ((0, 5), (1, 4)):
        assert shards[0][domain] == list(range(0, size, 2)) and shards[1][domain] == list(range(1, size, 2))
        assert sorted(shards[0][domain] + shards[1][domain]) == list(range(size))  # every item exactly once


def test_the_module_refuses_lightnings_distributed_sampler(tmp_path):
    class Connector:
        use_distributed_sampler = True

    class Trainer:
        world_size, global_rank, current_epoch = 2, 0, 0
        _accelerator_connector = Connector()

    dm = _dm(_unpaired(tmp_path))
    dm.setup("fit")
    dm.trainer = Trainer()
    for loader in (dm.train_dataloader, dm.val_dataloader):
        with pytest.raises(RuntimeError, match="use_distributed_sampler: false"):
            loader()


def test_dataset_without_transform_returns_the_pil_image(tmp_path):
    path = _write(tmp_path / "a.png")
    image, label, index = UnpairedImageDataset([path], labels=[4])[0]
    assert isinstance(image, Image.Image) and (label, index) == (4, 0)
    with pytest.raises(ValueError, match="1 labels for 2 files"):
        UnpairedImageDataset([path, path], labels=[1])


# -- the digit domains -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_domains(tmp_path_factory):
    return write_digit_domains(tmp_path_factory.mktemp("digits") / "digit_domains")


def _pixels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())]) / 255.0


def test_digit_domains_layout_counts_and_labels(digit_domains):
    from sklearn.datasets import load_digits

    counts = {split: len(list_images(digit_domains / split)) for split in ("trainA", "trainB", "testA", "testB")}
    assert counts == {"trainA": 751, "trainB": 749, "testA": 150, "testB": 147}
    target = load_digits().target
    with open(digit_domains / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1797 and len({row["file"] for row in rows}) == 1797  # every digit once, in one folder
    per_class = collections.Counter()
    for row in rows:
        index = int(row["file"][:-4])
        assert (digit_domains / row["split"] / row["file"]).is_file()
        assert int(row["label"]) == target[index]
        per_class[row["split"], int(row["label"])] += 1
    # Stratified: every digit holds its share of each split and domain (sklearn's order gave 6-25 per test domain).
    for digit in range(10):
        test_a, test_b = per_class["testA", digit], per_class["testB", digit]
        train_a, train_b = per_class["trainA", digit], per_class["trainB", digit]
        assert 14 <= test_a <= 16 and 14 <= test_b <= 16 and abs(test_a - test_b) <= 1 and abs(train_a - train_b) <= 1
        share = (test_a + test_b) / (test_a + test_b + train_a + train_b)
        assert abs(share - gan_digit_domains.TEST_FRACTION) < 0.01
    with Image.open(next((digit_domains / "testB").iterdir())) as im:
        assert im.size == (32, 32) and im.mode == "RGB" and im.format == "PNG"
    assert json.loads((digit_domains / "generated.json").read_text()) == {
        "generator": "gan_digit_domains", "version": 2, "params": {"image_size": 32, "seed": 0}}


def test_digit_domains_differ_as_designed(digit_domains):
    a, b = _pixels(digit_domains / "trainA"), _pixels(digit_domains / "trainB")
    spread_a, spread_b = a.max(-1) - a.min(-1), b.max(-1) - b.min(-1)
    assert a.mean() > 0.7 and b.mean() < 0.35  # light paper vs a dark background
    assert spread_a.max() == 0  # A is grey
    stroke_a = a.mean(-1) < 0.5  # dark ink
    stroke_b = spread_b > 0.3  # saturated colour: the background is grey and the glow too faint
    assert 0.05 < stroke_a.mean() and stroke_b.mean() > 1.5 * stroke_a.mean()  # bold vs thin, same digit mix
    assert (stroke_b.mean((1, 2)) > 0.05).all() and (stroke_a.mean((1, 2)) > 0.02).all()  # no image lost its digit
    hues = {tuple(np.round(b[i][stroke_b[i]].mean(0) / b[i][stroke_b[i]].mean(0).max(), 1)) for i in range(100)}
    assert len(hues) >= 5  # a colour per image from the palette


def test_both_domains_place_the_same_digit_the_same_way():
    from sklearn.datasets import load_digits

    images = load_digits().images
    for index in (0, 7, 1234):
        thin = render_digit(images[index], "A", 32, np.random.default_rng((0, index))) / 255.0
        bold = render_digit(images[index], "B", 32, np.random.default_rng((0, index))) / 255.0
        ink_a, ink_b = thin.mean(-1) < 0.5, (bold.max(-1) - bold.min(-1)) > 0.3
        assert (ink_a & ink_b).sum() >= 0.95 * ink_a.sum()  # the thin digit lies inside the bold one


def test_digit_domains_are_deterministic_and_written_once(digit_domains):
    from sklearn.datasets import load_digits

    png = sorted((digit_domains / "trainA").iterdir())[3]
    index = int(png.stem)
    assert np.array_equal(np.asarray(Image.open(png)),
                          render_digit(load_digits().images[index], "A", 32, np.random.default_rng((0, index))))
    stamps = {p: p.stat().st_mtime_ns for p in (png, digit_domains / "labels.csv", digit_domains / "generated.json")}
    assert write_digit_domains(digit_domains) == digit_domains
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_parameter_change_rewrites_and_the_datamodule_writes_on_first_use(tmp_path):
    root = tmp_path / "small"
    dm = DigitDomainsDataModule(root=str(root), image_size=16, load_size=18, batch_size=4)
    dm.setup("fit")  # no Trainer: setup writes the set itself
    assert json.loads((root / "generated.json").read_text())["params"]["image_size"] == 16
    from sklearn.datasets import load_digits

    assert len(dm.train_a) == 751 and dm.flip is False
    folders = gan_digit_domains.split_of_every_digit(load_digits().target, 0)
    assert dm.test_b.labels == [int(label) for label, folder in zip(load_digits().target, folders) if folder == "testB"]
    batch = _batches(dm.train_dataloader())[0]
    assert batch["A"][0].shape == (4, 3, 16, 16) and batch["B"][1].min() >= 0  # digit labels, not -1
    before = {p.name: p.read_bytes() for p in (root / "trainA").iterdir()}
    write_digit_domains(root, image_size=16, seed=1)
    assert json.loads((root / "generated.json").read_text())["params"]["seed"] == 1
    after = {p.name: p.read_bytes() for p in (root / "trainA").iterdir()}
    assert after.keys() != before.keys()  # another seed draws another split
    assert all(after[name] != before[name] for name in after.keys() & before.keys())  # and other renderings
    assert [p.name for p in tmp_path.iterdir()] == ["small"]  # no staging folder or old set left
    assert len(after) == len(folders) - folders.count("trainB") - folders.count("testA") - folders.count("testB")


def test_overwrite_rewrites_the_digit_domains_and_a_foreign_root_is_refused(tmp_path, monkeypatch):
    # Flat images instead of the renderer keep this fast: what is tested is when the set is (re)written.
    shade = {"value": 0}
    monkeypatch.setattr(gan_digit_domains, "render_digit",
                        lambda digit, domain, size, rng: np.full((size, size, 3), shade["value"], np.uint8))
    root = write_digit_domains(tmp_path / "digits", image_size=16)
    png = next((root / "trainB").iterdir())
    shade["value"] = 255
    write_digit_domains(root, image_size=16)  # the marker matches: nothing is rewritten
    assert np.asarray(Image.open(png)).max() == 0
    write_digit_domains(root, image_size=16, overwrite=True)
    assert np.asarray(Image.open(png)).min() == 255 and len(list_images(root / "trainB")) == 749
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no staging folder or old set left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "trainA").mkdir()
    with pytest.raises(ValueError, match="not a 'gan_digit_domains' set"):
        write_digit_domains(tmp_path / "mine", image_size=16, overwrite=True)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["trainA"]
