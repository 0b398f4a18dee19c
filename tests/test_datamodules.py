import numpy as np
import pytest
import torch

from conftest import write_cifar10, write_image_folder
from datamodules.base import CorruptImageError, DatasetNotFoundError
from datamodules.classification import CIFAR10DataModule, ImageFolderDataModule
from datamodules.digits import DigitsDataModule


def test_digits_split_is_stratified_disjoint_and_reproducible():
    dm = DigitsDataModule(image_size=16, split_seed=3)
    dm.setup("fit")
    splits = dm._splits
    all_index = np.concatenate(list(splits.values()))
    assert len(all_index) == len(set(all_index)) == 1797
    assert abs(len(splits["test"]) - 0.2 * 1797) <= 1 and abs(len(splits["val"]) - 0.1 * 1797) <= 1
    test_counts = np.bincount(dm._labels.numpy()[splits["test"]])
    assert test_counts.min() >= 34 and test_counts.max() <= 38  # ~36 per class: stratified
    again = DigitsDataModule(image_size=16, split_seed=3)
    again.setup("fit")
    assert all(np.array_equal(splits[k], again._splits[k]) for k in splits)
    other = DigitsDataModule(image_size=16, split_seed=4)
    other.setup("fit")
    assert not np.array_equal(splits["test"], other._splits["test"])
    x, y = dm.train_set[0]
    assert x.shape == (1, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1 and y.dtype == torch.int64


def test_digits_class_subset_is_relabelled_and_pixels_align():
    dm = DigitsDataModule(classes=[7, 3], augment=False, image_size=8)
    dm.setup("fit")
    assert dm.num_classes == 2
    pixels, labels = dm.pixel_arrays("test")
    assert set(labels) == {0, 1}
    images = torch.stack([dm.test_set[i][0] for i in range(len(dm.test_set))])
    # 8×8 images without resizing are the raw pixels / 16, in the same order as pixel_arrays
    np.testing.assert_allclose(images.flatten(1).numpy(), pixels / 16.0, atol=1e-6)
    with pytest.raises(ValueError, match="distinct digits"):
        DigitsDataModule(classes=[1, 1])


def test_image_folder_loads_real_jpegs(tmp_path):
    write_image_folder(tmp_path)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, batch_size=4, num_workers=0, pin_memory=False)
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.class_names == ["cat", "dog"]
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert dm.test_set is dm.val_set  # no test/ folder: test falls back to val


def test_image_folder_missing_root_names_path_and_layout(tmp_path):
    dm = ImageFolderDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "nowhere" in message and "<root>/train/<class_name>/" in message


def test_corrupt_image_fails_naming_the_file(tmp_path):
    write_image_folder(tmp_path)
    broken = tmp_path / "train" / "dog" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, batch_size=8, num_workers=0, pin_memory=False)
    dm.setup("fit")
    index = [i for i, (p, _) in enumerate(dm.train_set.samples) if p.endswith("broken.jpg")][0]
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        dm.train_set[index]


def test_cifar_missing_names_expected_folder(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup("fit")
    assert "cifar-10-batches-py" in str(err.value) and "download: true" in str(err.value)


def test_cifar10_reads_the_python_pickle_format(tmp_path):
    write_cifar10(tmp_path, per_batch=10)
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=10, batch_size=4, num_workers=0, pin_memory=False)
    dm.setup("fit")
    assert len(dm.train_set) == 40 and len(dm.val_set) == 10 and len(dm.test_set) == 10  # 5 × 10 train images
    assert sorted(dm.train_set.dataset.targets[i] for i in dm.val_set.indices) == list(range(10))  # 1 per class
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32


def test_cifar10_truncated_batch_is_named(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04 truncated")
    with pytest.raises(RuntimeError, match="incomplete or corrupt.*data_batch_3"):
        CIFAR10DataModule(root=str(tmp_path)).setup("fit")
