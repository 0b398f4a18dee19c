"""Semi-supervised data: the labeled split, the two-stream sampler, views, and the real on-disk formats."""

import numpy as np
import pytest
import torch

from datamodules.base import DatasetNotFoundError
from datamodules.digits import TensorImageDataset
from datamodules.semisup import (
    CIFAR10SemiSupDataModule, Cutout, DigitsSemiSupDataModule, STL10SemiSupDataModule,
    SVHNSemiSupDataModule, TwoViewDataset, labeled_split,
)


def test_labeled_split_is_exactly_k_per_class_reproducible_and_seed_dependent():
    targets = np.repeat(np.arange(4), 10)
    a = labeled_split(targets, 3, 4, seed=0)
    assert np.bincount(targets[a], minlength=4).tolist() == [3, 3, 3, 3]
    assert np.array_equal(a, labeled_split(targets, 3, 4, seed=0))
    assert not np.array_equal(a, labeled_split(targets, 3, 4, seed=1))
    with pytest.raises(ValueError, match="class 2"):
        labeled_split(np.array([0, 0, 1, 1, 2]), 2, 3, seed=0)


def test_cutout_zeroes_one_square_and_two_views_differ():
    torch.manual_seed(0)
    image = torch.ones(1, 16, 16)
    cut = Cutout(4)(image)
    zeros = (cut == 0).sum().item()
    assert 4 <= zeros <= 16 and image.min() == 1  # clipped at a border it can be smaller; the input is untouched
    rows, cols = torch.nonzero(cut[0] == 0, as_tuple=True)
    assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == zeros  # one rectangle
    base = TensorImageDataset(torch.rand(3, 1, 16, 16), torch.tensor([0, 1, 2]))
    (weak, strong), target = TwoViewDataset(base, lambda x: x, lambda x: Cutout(0.5)(x))[1]
    assert target == 1 and torch.equal(weak, base.images[1]) and not torch.equal(weak, strong)


def test_digits_split_batches_and_pixel_arrays():
    data = DigitsSemiSupDataModule(split_seed=0)
    data.setup()
    assert len(data.labeled_set) == 50 and len(data.unlabeled_set) == 1257 and len(data.test_set) == 540
    assert np.bincount(data.labeled_set.labels.numpy(), minlength=10).tolist() == [5] * 10
    loader = data.train_dataloader()
    iterator = iter(loader)
    assert len(loader) == 1257 // 112
    batch = next(iterator)
    batch = batch[0] if isinstance(batch, tuple) else batch
    images_l, labels_l = batch["labeled"]
    (weak, strong), hidden = batch["unlabeled"]
    assert images_l.shape == (16, 1, 16, 16) and labels_l.shape == (16,)
    assert weak.shape == strong.shape == (112, 1, 16, 16) and hidden.shape == (112,)
    assert not torch.equal(weak, strong)
    x_l, y_l = data.pixel_arrays("labeled")
    assert x_l.shape == (50, 64) and np.array_equal(y_l, data.labeled_set.labels.numpy())
    # the 16-px tensors are the 8-px pixels resized: pooled back, they match the raw array (scaled by 16)
    pooled = torch.nn.functional.avg_pool2d(data.labeled_set.images, 2).flatten(1).numpy() * 16
    assert np.corrcoef(pooled.ravel(), x_l.ravel())[0, 1] > 0.95
    x_u, _ = data.pixel_arrays("unlabeled")
    assert len(x_u) == 1257
    excluded = DigitsSemiSupDataModule(unlabeled_includes_labeled=False)
    excluded.setup()
    assert len(excluded.unlabeled_set) == 1207
    assert not set(excluded.labeled_indices) & set(excluded.unlabeled_indices)


def test_missing_data_names_the_expected_layout(tmp_path):
    for module, expected in [(CIFAR10SemiSupDataModule, "cifar-10-batches-py"), (SVHNSemiSupDataModule, "train_32x32.mat"),
                             (STL10SemiSupDataModule, "train_X.bin")]:
        with pytest.raises(DatasetNotFoundError, match=expected):
            module(root=str(tmp_path / "nothing"), num_workers=0).setup()


def test_cifar10_pickles_load_into_labeled_and_two_view_streams(tmp_path):
    from conftest import write_cifar10

    write_cifar10(tmp_path, per_batch=20)
    data = CIFAR10SemiSupDataModule(root=str(tmp_path), num_labels_per_class=2, batch_size=4, mu=2, num_workers=0,
                                    pin_memory=False)
    data.setup()
    assert len(data.labeled_set) == 20 and len(data.unlabeled_set) == 100 and len(data.test_set) == 20
    batch = next(iter(data.train_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch
    (weak, strong), _ = batch["unlabeled"]
    assert weak.shape == strong.shape == (8, 3, 32, 32) and weak.dtype == torch.float32
    assert batch["labeled"][0].shape == (4, 3, 32, 32)


def test_svhn_mat_files_map_label_10_to_digit_0(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split, n in [("train", 30), ("test", 10)]:
        labels = np.arange(n).reshape(-1, 1) % 10
        labels[labels == 0] = 10
        savemat(tmp_path / f"{split}_32x32.mat",
                {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": labels.astype(np.uint8)})
    data = SVHNSemiSupDataModule(root=str(tmp_path), num_labels_per_class=1, batch_size=2, mu=2, num_workers=0)
    data.setup()
    assert sorted(data.labeled_set.labels.tolist()) == list(range(10))
    assert data.test_set.labels[:3].tolist() == [0, 1, 2]
    mat = __import__("scipy.io", fromlist=["loadmat"]).loadmat(tmp_path / "train_32x32.mat")
    assert torch.equal(data.unlabeled_set.base.images[4], torch.from_numpy(mat["X"][..., 4]).permute(2, 1, 0).transpose(1, 2))


def test_stl10_binaries_load_with_unlabeled_targets_minus_one_and_folds(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    images = {}
    for split, n in [("train", 20), ("test", 10), ("unlabeled", 6)]:
        hwc = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        images[split] = hwc
        # the release stores each channel column-major: (N, 3, W, H) in C order
        hwc.transpose(0, 3, 2, 1).tofile(folder / f"{split}_X.bin")
        if split != "unlabeled":
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "fold_indices.txt").write_text("\n".join(" ".join(str(i) for i in range(f, 20, 10)) for f in range(10)))
    data = STL10SemiSupDataModule(root=str(tmp_path), batch_size=2, mu=2, num_workers=0)
    data.setup()
    assert len(data.labeled_set) == 20 and data.labeled_set.labels[:3].tolist() == [0, 1, 2]
    assert len(data.unlabeled_set) == 26
    assert (data.unlabeled_set.base.labels[20:] == -1).all()
    assert torch.equal(data.labeled_set.images[3], torch.from_numpy(images["train"][3]).permute(2, 0, 1))
    fold = STL10SemiSupDataModule(root=str(tmp_path), fold=3, batch_size=2, mu=2, num_workers=0)
    fold.setup()
    assert fold.labeled_set.labels.tolist() == [3, 3]


def test_ddp_without_disabling_lightnings_sampler_is_refused():
    class FakeTrainer:
        world_size, global_rank, current_epoch = 2, 0, 0

        class _accelerator_connector:
            use_distributed_sampler = True

    data = DigitsSemiSupDataModule()
    data.setup()
    data.trainer = FakeTrainer()
    for loader in (data.train_dataloader, data.test_dataloader):
        with pytest.raises(RuntimeError, match="use_distributed_sampler: false"):
            loader()
