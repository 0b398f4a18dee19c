"""Class-incremental data (datamodules/continual.py): task layout, relabelling into class-order space, the three
sources read through their real formats, and loaders that serve what the model requests."""

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from datamodules.base import DatasetNotFoundError
from datamodules.continual import (CIFAR100_ICARL_CLASS_ORDER, CIFAR100ClassIncrementalDataModule,
                                   DigitsClassIncrementalDataModule, ImageFolderClassIncrementalDataModule,
                                   per_class_holdout, task_layout)

DIGIT_ORDER = [3, 7, 0, 9, 1, 5, 2, 8, 4, 6]


class FakeTrainer:
    """What the datamodule reads of a Trainer: the LightningModule, the rank and the sampler setting."""

    def __init__(self, module=None, rank: int = 0, world: int = 1) -> None:
        self.lightning_module, self.global_rank, self.world_size, self.current_epoch = module, rank, world, 0
        self._accelerator_connector = SimpleNamespace(use_distributed_sampler=False)


def loader_pool_indices(loader) -> list[int]:
    """The pool indices a training loader's batches hold this epoch (through its Subset), in serving order."""
    return [loader.dataset.indices[i] for batch in loader.batch_sampler for i in batch]


@pytest.fixture(scope="module")
def digits():
    data = DigitsClassIncrementalDataModule(class_order=DIGIT_ORDER, batch_size=16)
    data.setup()
    return data


# ---- layout ---------------------------------------------------------------------------------------------------------

def test_task_layout_gives_equal_tasks_or_a_larger_first_task():
    layout = task_layout(10, 5)
    assert layout.class_order == list(range(10))
    assert layout.task_classes == [2, 2, 2, 2, 2] and layout.task_offsets == [0, 2, 4, 6, 8]
    first = task_layout(100, 6, first_task_classes=50)
    assert first.task_classes == [50, 10, 10, 10, 10, 10] and first.task_offsets == [0, 50, 60, 70, 80, 90]


def test_task_layout_refuses_uneven_tasks_and_orders_that_are_not_permutations():
    with pytest.raises(ValueError, match=r"num_tasks=3 .* 10 classes"):
        task_layout(10, 3)
    with pytest.raises(ValueError, match=r"7 classes .* num_tasks - 1 = 2"):
        task_layout(10, 3, first_task_classes=3)
    with pytest.raises(ValueError, match=r"repeated \[1\].*missing \[2\]"):
        task_layout(4, 2, [0, 1, 1, 3])
    with pytest.raises(ValueError, match=r"3 entries for 4 classes"):
        task_layout(4, 2, [0, 1, 2])
    with pytest.raises(ValueError, match=r"num_tasks=4 .* 10 classes"):
        DigitsClassIncrementalDataModule(num_tasks=4)
    with pytest.raises(ValueError, match=r"not a class id \[10\]"):
        DigitsClassIncrementalDataModule(class_order=[10, *range(1, 10)])


def test_per_class_holdout_takes_the_rounded_share_of_every_class_seeded():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 5 + [3] * 30)
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    held = per_class_holdout(labels, 0.15, seed=3)
    # 1.5, 3, 0.75, 4.5 rounded as FACIL's np.round: halves to even
    assert torch.bincount(labels[held], minlength=4).tolist() == [2, 3, 1, 4]
    assert torch.bincount(labels[per_class_holdout(labels, 0.1, seed=3)], minlength=4).tolist() == [1, 2, 0, 3]
    assert torch.equal(held, per_class_holdout(labels, 0.15, seed=3))
    draws = {tuple(torch.nonzero(per_class_holdout(labels, 0.15, seed=s)).flatten().tolist()) for s in range(6)}
    assert len(draws) > 1


def test_task_of_label_maps_global_labels_to_tasks_with_a_larger_first_task():
    data = DigitsClassIncrementalDataModule(num_tasks=4, first_task_classes=4)
    assert data.task_classes == [4, 2, 2, 2] and data.task_offsets == [0, 4, 6, 8]
    labels = torch.tensor([[0, 3, 4], [5, 6, 9]])
    assert data.task_of_label(labels).tolist() == [[0, 0, 1], [1, 2, 3]]


def test_class_order_seed_is_a_seeded_permutation_of_the_digits():
    data = DigitsClassIncrementalDataModule(class_order_seed=5)
    assert data.class_order == np.random.default_rng(5).permutation(10).tolist()
    assert data.class_order != list(range(10))
    assert DigitsClassIncrementalDataModule(class_order_seed=6).class_order != data.class_order
    assert DigitsClassIncrementalDataModule().class_order == list(range(10))


# ---- relabelling, on digits ------------------------------------------------------------------------------------------

def test_permuted_class_order_labels_original_class_k_as_its_position(digits):
    original = load_digits()
    source = digits.train_pool.source_index
    assert digits.class_order == DIGIT_ORDER and digits.class_names == [str(c) for c in DIGIT_ORDER]
    # every item of original class class_order[k] has label k
    expected = torch.tensor([DIGIT_ORDER.index(int(c)) for c in original.target[source.numpy()]])
    assert torch.equal(digits.train_pool_labels, expected)
    assert digits.train_pool_labels[torch.from_numpy(original.target[source.numpy()] == 3)].unique().tolist() == [0]
    # the images are the raw 8×8 digits in [0, 1], the same in both twins of the pool
    image, label = digits.train_pool_plain[5]
    assert torch.allclose(image[0], torch.from_numpy(original.images[int(source[5])] / 16.0).float())
    assert torch.equal(digits.train_pool[5][0], image) and int(label) == int(expected[5])


def test_train_indices_are_exactly_the_items_of_the_given_tasks(digits):
    indices = digits.train_indices([1, 3])
    wanted = [i for i, label in enumerate(digits.train_pool_labels.tolist()) if label in (2, 3, 6, 7)]
    assert indices.tolist() == wanted and indices.dtype == torch.int64
    assert digits.train_indices([]).tolist() == []
    with pytest.raises(ValueError, match="outside 0..4"):
        digits.train_indices([5])


def test_task_splits_partition_every_digit_of_the_task_70_10_20(digits):
    original = load_digits().target
    for task in range(digits.num_tasks):
        classes = DIGIT_ORDER[2 * task: 2 * task + 2]
        val, test = digits.task_set("val", task), digits.task_set("test", task)
        assert set(val.labels.tolist()) == set(test.labels.tolist()) == {2 * task, 2 * task + 1}
        sources = torch.cat([digits.train_pool.source_index[digits.train_indices([task])], val.source_index,
                             test.source_index])
        assert sorted(sources.tolist()) == np.flatnonzero(np.isin(original, classes)).tolist()
        assert abs(len(test) / len(sources) - 0.2) < 0.02 and abs(len(val) / len(sources) - 0.1) < 0.02
    with pytest.raises(ValueError, match="'val' or 'test'"):
        digits.task_set("train", 0)


# ---- loaders --------------------------------------------------------------------------------------------------------

def test_train_loader_serves_the_requested_task_and_exemplars_once_each(digits):
    task0 = digits.train_indices([0])
    task2 = digits.train_indices([2])
    exemplars = torch.cat([task0[:5], task2[:3], task0[:2]])  # two exemplars are current-task data, two repeat
    module = SimpleNamespace(training_request=lambda: {"tasks": [2], "extra_indices": exemplars},
                             seen_tasks=lambda: 3)
    digits.trainer = FakeTrainer(module)
    try:
        loader = digits.train_dataloader()
        expected = sorted(set(task2.tolist()) | set(task0[:5].tolist()))
        assert loader.dataset.indices == expected
        served = loader_pool_indices(loader)
        assert sorted(served) == expected  # every item once per epoch
        labels = torch.cat([batch[1] for batch in loader])
        assert sorted(labels.tolist()) == sorted(digits.train_pool_labels[expected].tolist())
        assert set(labels.tolist()) == {0, 1, 4, 5}
        for name in ("val_dataloader", "test_dataloader"):
            loaders = getattr(digits, name)()
            assert len(loaders) == 3
            for task, eval_loader in enumerate(loaders):
                assert set(torch.cat([b[1] for b in eval_loader]).tolist()) == {2 * task, 2 * task + 1}
    finally:
        digits.trainer = None


def test_the_modules_request_wins_over_set_request_which_wins_over_all_tasks():
    data = DigitsClassIncrementalDataModule()
    data.setup()
    assert len(data.train_dataloader().dataset) == len(data.train_pool) and len(data.val_dataloader()) == 5
    data.set_request([4], extra_indices=[0])
    data.set_seen(2)
    assert data.train_dataloader().dataset.indices == sorted({0, *data.train_indices([4]).tolist()})
    assert len(data.test_dataloader()) == 2
    data.trainer = FakeTrainer(SimpleNamespace(training_request=lambda: {"tasks": [1]}, seen_tasks=lambda: 4))
    assert data.train_dataloader().dataset.indices == data.train_indices([1]).tolist()
    assert len(data.val_dataloader()) == 4
    data.trainer = FakeTrainer(SimpleNamespace(training_request=lambda: None))  # None: every task
    assert len(data.train_dataloader().dataset) == len(data.train_pool) and len(data.val_dataloader()) == 2
    data.trainer = FakeTrainer(SimpleNamespace(training_request=lambda: {"tasks": [0], "extra_indices": [10 ** 6]}))
    with pytest.raises(ValueError, match="outside the training pool"):
        data.train_dataloader()


def test_two_ranks_get_disjoint_shards_covering_the_requested_items(digits):
    tasks_items = torch.cat([digits.train_indices([0, 1])])
    extra = digits.train_indices([4])[: 4 + len(tasks_items) % 2]  # an even total: no padding repeat
    module = SimpleNamespace(training_request=lambda: {"tasks": [0, 1], "extra_indices": extra})
    shards, eval_shards = [], []
    try:
        for rank in range(2):
            digits.trainer = FakeTrainer(module, rank=rank, world=2)
            shards.append(loader_pool_indices(digits.train_dataloader()))
            eval_shards.append([digits.task_set("val", 0).source_index[i].item()
                                for i in digits.val_dataloader()[0].dataset.indices])
    finally:
        digits.trainer = None
    requested = sorted(set(tasks_items.tolist()) | set(extra.tolist()))
    assert len(requested) % 2 == 0 and len(shards[0]) == len(shards[1]) == len(requested) // 2
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == requested
    assert not set(eval_shards[0]) & set(eval_shards[1])
    assert sorted(eval_shards[0] + eval_shards[1]) == sorted(digits.task_set("val", 0).source_index.tolist())


# ---- CIFAR-100 --------------------------------------------------------------------------------------------------------

def write_cifar100(root, train_per_class: int = 10, test_per_class: int = 2):
    """A tiny CIFAR-100 in the release's python pickle format (``cifar-100-python/train``, ``test``, ``meta``, the
    files torchvision's ``CIFAR100`` lists); pixel 0 of every image holds its class id, pixel 1 its index."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), per_class)[::-1].copy()  # not in class order on disk
        data = np.random.default_rng(0).integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        data[:, 0], data[:, 1] = labels, np.arange(len(labels)) % 256
        batch = {"filenames": [f"{i}.png" for i in range(len(labels))], "batch_label": name,
                 "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(), "data": data}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"fine{c}" for c in range(100)],
                     "coarse_label_names": [f"coarse{c}" for c in range(20)]}, f)
    return root


def test_icarl_order_is_facils_permutation_with_10x10_and_5x20_tasks(tmp_path):
    assert sorted(CIFAR100_ICARL_CLASS_ORDER) == list(range(100))
    assert CIFAR100_ICARL_CLASS_ORDER[:4] == (68, 56, 78, 8) and CIFAR100_ICARL_CLASS_ORDER[-1] == 33
    ten = CIFAR100ClassIncrementalDataModule(root=str(tmp_path / "absent"))  # no file is read for the layout
    assert ten.class_order == list(CIFAR100_ICARL_CLASS_ORDER)
    assert ten.task_classes == [10] * 10 and ten.task_offsets == list(range(0, 100, 10))
    five = CIFAR100ClassIncrementalDataModule(root=str(tmp_path / "absent"), num_tasks=5)
    assert five.task_classes == [20] * 5 and five.task_offsets == [0, 20, 40, 60, 80]
    assert CIFAR100ClassIncrementalDataModule(root=str(tmp_path), class_order="natural").class_order == list(range(100))
    with pytest.raises(ValueError, match=r"num_tasks=7 .* 100 classes"):
        CIFAR100ClassIncrementalDataModule(root=str(tmp_path), num_tasks=7)
    with pytest.raises(ValueError, match=r"missing \[99\]"):
        CIFAR100ClassIncrementalDataModule(root=str(tmp_path), class_order=list(range(99)) + [0])


def test_cifar_class_order_seed_shuffles_as_facils_numpy_global_shuffle(tmp_path):
    state = np.random.get_state()
    try:
        np.random.seed(4)
        expected = list(CIFAR100_ICARL_CLASS_ORDER)
        np.random.shuffle(expected)
    finally:
        np.random.set_state(state)
    data = CIFAR100ClassIncrementalDataModule(root=str(tmp_path), class_order_seed=4)
    assert data.class_order == expected != list(CIFAR100_ICARL_CLASS_ORDER)


def test_cifar100_pickles_load_into_icarl_tasks(tmp_path):
    data = CIFAR100ClassIncrementalDataModule(root=str(write_cifar100(tmp_path)), num_workers=0, pin_memory=False,
                                              batch_size=8)
    data.setup()
    order = torch.tensor(CIFAR100_ICARL_CLASS_ORDER)
    pool = data.train_pool
    pixel0 = pool.store.images[pool.source_index][:, 0, 0, 0].long()  # the original class id written in the image
    assert torch.equal(order[data.train_pool_labels], pixel0)
    # FACIL's validation: round(10 × 0.1) = 1 training image of every class; the test split is the official one
    assert len(pool) == 900 and len(data.val_set) == 100 and len(data.test_set) == 200
    assert torch.bincount(data.val_set.labels, minlength=100).tolist() == [1] * 100
    assert not set(data.val_set.source_index.tolist()) & set(pool.source_index.tolist())
    test0 = data.task_set("test", 0)
    assert sorted(test0.labels.tolist()) == sorted(list(range(10)) * 2)
    image, label = test0[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    raw = test0.store[int(test0.source_index[0])]
    assert torch.allclose(data.denormalize(image[None])[0] * 255, raw.float(), atol=1e-3)
    assert int(raw[0, 0, 0]) == CIFAR100_ICARL_CLASS_ORDER[int(label)]
    assert data.class_names[:2] == ["fine68", "fine56"]
    # the pool's twin serves the same images without augmentation; the pool crops and flips them
    torch.manual_seed(0)
    augmented = 0
    for i in range(8):
        raw = pool.store[int(pool.source_index[i])].float()
        plain, augmented_image = data.train_pool_plain[i][0], data.train_pool[i][0]
        assert torch.allclose(data.denormalize(plain[None])[0] * 255, raw, atol=1e-3)
        assert augmented_image.shape == (3, 32, 32)
        augmented += not torch.allclose(augmented_image, plain)
    assert augmented >= 4


def test_missing_cifar100_names_the_folder_and_how_to_get_it(tmp_path):
    data = CIFAR100ClassIncrementalDataModule(root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=r"cifar-100-python(.|\n)*download: true"):
        data.setup()


# ---- ImageFolder ------------------------------------------------------------------------------------------------------

FOLDER_CLASSES = ("ant", "bee", "cat", "dog")


def write_class_tree(root, train_per_class: int = 10, val_per_class: int = 2, val_classes=FOLDER_CLASSES):
    """``train/`` and ``val/`` class folders of 8×8 PNGs whose grey value is 40 × (class position + 1)."""
    for split, per_class, classes in (("train", train_per_class, FOLDER_CLASSES), ("val", val_per_class, val_classes)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            value = 40 * (FOLDER_CLASSES.index(name) + 1) if name in FOLDER_CLASSES else 250
            for i in range(per_class):
                Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_image_folder_tree_loads_in_the_given_order(tmp_path):
    data = ImageFolderClassIncrementalDataModule(
        root=str(write_class_tree(tmp_path)), num_tasks=3, first_task_classes=2, class_order=["cat", "ant", 3, "bee"],
        image_size=8, crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1), num_workers=0, pin_memory=False)
    assert data.class_order == [2, 0, 3, 1] and data.class_names == ["cat", "ant", "dog", "bee"]
    assert data.task_classes == [2, 1, 1]
    data.setup()
    assert len(data.train_pool) == 36 and len(data.val_set) == 4 and len(data.test_set) == 8
    for split in ("val", "test"):
        items = data.task_set(split, 0)
        grey = torch.stack([image[0, 0, 0] for image, _ in items])
        labels = torch.stack([label for _, label in items])
        assert set(labels.tolist()) == {0, 1}
        # label 0 is "cat" (grey 120), label 1 "ant" (grey 40)
        assert torch.allclose(grey * 255, torch.where(labels == 0, 120.0, 40.0), atol=0.5)
    for task, grey_value in ((1, 160.0), (2, 80.0)):  # task 1 is "dog", task 2 "bee"
        pool_grey = torch.stack([data.train_pool_plain[i][0][0, 0, 0] for i in data.train_indices([task]).tolist()])
        assert len(pool_grey) == 9 and torch.allclose(pool_grey * 255, torch.full_like(pool_grey, grey_value), atol=0.5)


def test_missing_image_folder_names_the_layout(tmp_path):
    data = ImageFolderClassIncrementalDataModule(root=str(tmp_path / "nowhere"), num_tasks=2)
    with pytest.raises(DatasetNotFoundError, match=r"<root>/train/<class_name>"):
        data.setup()
    with pytest.raises(DatasetNotFoundError, match=r"<root>/val/<class_name>"):
        _ = data.num_classes
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "only_train" / "train" / "a" / "0.png")
    with pytest.raises(DatasetNotFoundError, match=r"split 'test'"):
        ImageFolderClassIncrementalDataModule(root=str(tmp_path / "only_train"), num_tasks=1).setup()


def test_test_classes_missing_from_train_are_refused(tmp_path):
    root = write_class_tree(tmp_path, val_classes=(*FOLDER_CLASSES, "eel"))
    with pytest.raises(ValueError, match=r"lacks: \['eel'\]"):
        ImageFolderClassIncrementalDataModule(root=str(root), num_tasks=2).setup()
    with pytest.raises(ValueError, match=r"not in .*\['emu'\]"):
        _ = ImageFolderClassIncrementalDataModule(root=str(root), num_tasks=2,
                                                  class_order=["emu", "ant", "bee", "cat"]).class_order


def test_a_test_split_with_fewer_classes_keeps_the_training_class_ids(tmp_path):
    root = write_class_tree(tmp_path, val_classes=("bee", "dog"))  # no "ant", "cat" test images
    data = ImageFolderClassIncrementalDataModule(root=str(root), num_tasks=4, image_size=8, crop_pct=1.0,
                                                 mean=(0, 0, 0), std=(1, 1, 1), num_workers=0, pin_memory=False)
    data.setup()
    assert [len(data.task_set("test", task)) for task in range(4)] == [0, 2, 0, 2]
    for task, grey_value in ((1, 80.0), (3, 160.0)):
        for image, label in data.task_set("test", task):
            assert int(label) == task and abs(float(image[0, 0, 0]) * 255 - grey_value) < 0.5


def test_lightning_rebuilds_the_loaders_each_epoch_from_the_modules_request(tmp_path):
    import lightning as L

    class TaskByEpoch(L.LightningModule):
        """Trains on task ``epoch`` (plus one exemplar of task 0 from epoch 1), validates tasks ``0 .. epoch``."""

        def __init__(self, exemplar: int) -> None:
            super().__init__()
            self.linear, self.exemplar = torch.nn.Linear(64, 10), exemplar
            self.train_labels: dict[int, set] = {}
            self.val_loaders: dict[int, set] = {}

        def training_request(self):
            epoch = self.trainer.current_epoch
            return {"tasks": [epoch], "extra_indices": [self.exemplar] if epoch else None}

        def seen_tasks(self) -> int:
            return self.trainer.current_epoch + 1

        def training_step(self, batch, batch_idx):
            self.train_labels.setdefault(self.current_epoch, set()).update(batch[1].tolist())
            return torch.nn.functional.cross_entropy(self.linear(batch[0].flatten(1)), batch[1])

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            self.val_loaders.setdefault(self.current_epoch, set()).add(dataloader_idx)
            assert set(batch[1].tolist()) <= {2 * dataloader_idx, 2 * dataloader_idx + 1}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = DigitsClassIncrementalDataModule(batch_size=64)
    data.setup()
    module = TaskByEpoch(exemplar=int(data.train_indices([0])[0]))
    trainer = L.Trainer(max_epochs=3, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert module.train_labels == {0: {0, 1}, 1: {0, 2, 3}, 2: {0, 4, 5}}
    assert module.val_loaders == {0: {0}, 1: {0, 1}, 2: {0, 1, 2}}


def test_cifar_facil_augmentation_is_pad_then_random_resized_crop(tmp_path):
    from torchvision.transforms import v2 as transforms

    facil = CIFAR100ClassIncrementalDataModule(root=str(tmp_path), augment="facil").train_transform()
    kinds = [type(t) for t in facil.transforms]
    assert kinds.index(transforms.Pad) < kinds.index(transforms.RandomResizedCrop)
    assert facil(torch.zeros(3, 32, 32, dtype=torch.uint8)).shape == (3, 32, 32)
    plain = CIFAR100ClassIncrementalDataModule(root=str(tmp_path)).train_transform()
    assert transforms.RandomCrop in [type(t) for t in plain.transforms]
    with pytest.raises(ValueError, match="augment"):
        CIFAR100ClassIncrementalDataModule(root=str(tmp_path), augment="strong")
