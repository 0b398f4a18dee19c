"""Class-incremental data: a dataset's classes cut into tasks learned one after the other, for ANCL
(Kim, Noci, Orvieto, Hofmann, "Achieving a Better Stability-Plasticity Trade-off via Auxiliary Networks in Continual
Learning", CVPR 2023) and the FACIL baselines it builds on (Masana et al., "Class-incremental learning: survey and
performance evaluation on image classification", TPAMI 2022; code github.com/mmasana/FACIL).

The classes are put in an order (``class_order``: original dataset ids, in the order they are learned) and relabelled
by their position in it, so labels everywhere are *global ids in class-order space*: with ``class_order = [68, 56,
...]`` an image of original class 68 has label 0. Task ``t`` owns the labels ``task_offsets[t] .. task_offsets[t] +
task_classes[t] - 1`` (FACIL's ``taskcla`` and ``task_offset``; FACIL's datasets hand out labels minus the offset and
add it back, here the global label travels with the item and the model subtracts ``task_offsets[t]`` where a head
needs it).

After ``setup`` the datamodule holds one training *pool* (every training item of every task, ``train_pool`` with the
training transform and ``train_pool_plain`` with the evaluation one, for herding features and Fisher passes) and the
val/test items; which tasks a loader serves is asked of the LightningModule every time a loader is built (the model
sets ``trainer.reload_dataloaders_every_n_epochs = 1``):

* ``module.training_request()``: ``None`` (every task) or ``{"tasks": [t, ...], "extra_indices": pool indices}``
  (exemplars); the training loader serves the union, each item once;
* ``module.seen_tasks()``: ``n``, the validation and test loaders are one per task ``0 .. n-1``, so Lightning's
  ``dataloader_idx`` is the task id.

Without such a module (tests, notebooks) ``set_request`` / ``set_seen`` give the same answers; with none of them, all
tasks are served.

Sources:

* ``DigitsClassIncrementalDataModule``: scikit-learn's digits, 5 tasks × 2 classes (the zoo's embedded default);
* ``CIFAR100ClassIncrementalDataModule``: CIFAR-100 in the python pickle format, FACIL's ``cifar100_icarl`` order;
* ``ImageFolderClassIncrementalDataModule``: any ``train/<class>/`` + ``val/<class>/`` tree (Tiny ImageNet,
  ImageNet-subset, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import v2

from datamodules.base import IMAGENET_MEAN, IMAGENET_STD, ZooDataModule, read_image, require_path
from datamodules.cifar import CIFAR_FOLDERS, download_cifar, load_cifar_pickle, open_cifar
from datamodules.digits import digit_image_transform, load_digit_images, split_indices
from datamodules.sampler import RandomBatchSampler

__all__ = [
    "CIFAR100_ICARL_CLASS_ORDER", "TaskLayout", "task_layout", "per_class_holdout", "TensorImages", "ImageFiles",
    "RelabelledItems", "ClassIncrementalDataModule", "DigitsClassIncrementalDataModule",
    "CIFAR100ClassIncrementalDataModule", "ImageFolderClassIncrementalDataModule",
]

#: FACIL's ``cifar100_icarl`` class order (``src/datasets/dataset_config.py`` of mmasana/FACIL @66e3e8e), the order
#: of iCaRL's CIFAR-100 experiments that ANCL's ``scripts/script_cifar100_10.sh`` trains on
CIFAR100_ICARL_CLASS_ORDER = (
    68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38, 58, 70, 77, 1, 85, 19, 17, 50,
    28, 53, 13, 81, 45, 82, 6, 59, 83, 16, 15, 44, 91, 41, 72, 60, 79, 52, 20, 10, 31, 54, 37, 95, 14, 71, 96,
    98, 97, 2, 64, 66, 42, 22, 35, 86, 24, 34, 87, 21, 99, 0, 88, 27, 18, 94, 11, 12, 47, 25, 30, 46, 62, 69,
    36, 61, 7, 63, 75, 5, 32, 4, 51, 48, 73, 93, 39, 67, 29, 49, 57, 33,
)


# ---- the task layout ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskLayout:
    """Which classes are learned when: ``class_order[k]`` is the original id of global label ``k``; task ``t`` owns
    the labels ``task_offsets[t] .. task_offsets[t] + task_classes[t] - 1``."""

    class_order: list[int]
    task_classes: list[int]
    task_offsets: list[int]


def task_layout(num_classes: int, num_tasks: int, class_order: Optional[Sequence[int]] = None,
                first_task_classes: Optional[int] = None) -> TaskLayout:
    """The tasks of ``num_classes`` classes: ``num_tasks`` equal tasks, or ``first_task_classes`` then the rest split
    equally over the other ``num_tasks - 1`` (FACIL's ``nc_first_task``, e.g. 50 + 5 × 10 on CIFAR-100).

    FACIL gives the remainder of an uneven split to the first tasks; here an uneven split is refused, so that every
    config states its tasks exactly.

    Raises:
        ValueError: ``num_tasks`` does not divide the classes (naming both numbers), ``first_task_classes`` is out of
            range, or ``class_order`` is not a permutation of ``0 .. num_classes - 1`` (naming what is wrong).
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
    order = list(range(num_classes)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(num_classes)):
        duplicates = sorted({c for c in order if order.count(c) > 1})
        outside = sorted({c for c in order if not 0 <= c < num_classes})
        missing = sorted(set(range(num_classes)) - set(order))
        problems = [f"{len(order)} entries for {num_classes} classes"] if len(order) != num_classes else []
        problems += [f"{name} {values[:10]}{'...' if len(values) > 10 else ''}"
                     for name, values in (("repeated", duplicates), ("not a class id", outside),
                                          ("missing", missing)) if values]
        raise ValueError(f"class_order must be a permutation of the class ids 0..{num_classes - 1}: "
                         + "; ".join(problems))
    if first_task_classes is None:
        if num_classes % num_tasks:
            raise ValueError(f"num_tasks={num_tasks} does not divide the {num_classes} classes into equal tasks "
                             "(choose a divisor, or set first_task_classes)")
        task_classes = [num_classes // num_tasks] * num_tasks
    else:
        if num_tasks < 2 or not 1 <= first_task_classes < num_classes:
            raise ValueError(f"first_task_classes={first_task_classes} needs num_tasks ≥ 2 (got {num_tasks}) and "
                             f"1 ≤ first_task_classes < {num_classes} classes")
        rest = num_classes - first_task_classes
        if rest % (num_tasks - 1):
            raise ValueError(f"the {rest} classes after first_task_classes={first_task_classes} do not split into "
                             f"num_tasks - 1 = {num_tasks - 1} equal tasks")
        task_classes = [first_task_classes] + [rest // (num_tasks - 1)] * (num_tasks - 1)
    offsets = np.concatenate([[0], np.cumsum(task_classes)[:-1]]).tolist()
    return TaskLayout(order, task_classes, [int(o) for o in offsets])


def per_class_holdout(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """A seeded mask of ``round(fraction × n_c)`` random items of every class ``c`` (FACIL's validation split:
    ``random.sample`` of ``np.round(len(class) * validation)`` training images per class; numpy and torch both round
    halves to even).

    Vectorised: a random key per item sorts the items by class and randomly inside each class, and an item is held
    out when its rank inside its class is below its class's share.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    keys = torch.rand(len(labels), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    order = torch.argsort(labels.double() + keys)  # keys < 1: sorted by class, shuffled within a class
    sorted_labels = labels[order]
    rank_in_class = torch.arange(len(labels)) - torch.searchsorted(sorted_labels, sorted_labels)
    share = torch.round(torch.bincount(labels).double() * fraction).long()
    held = torch.zeros(len(labels), dtype=torch.bool)
    held[order] = rank_in_class < share[sorted_labels]
    return held


# ---- items ----------------------------------------------------------------------------------------------------------

class TensorImages:
    """Images held in memory as one tensor ``(N, C, H, W)``: ``store[i]`` is image ``i``."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


class ImageFiles:
    """Images on disk: ``store[i]`` reads file ``i`` (``read_image``, which names an undecodable file)."""

    def __init__(self, paths: Sequence[str | Path], mode: str = "RGB") -> None:
        self.paths, self.mode = [str(p) for p in paths], mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Any:
        return read_image(self.paths[index], self.mode)


class RelabelledItems(Dataset):
    """Item ``i`` is ``(transform(store[source_index[i]]), labels[i])``: some images of a store with their global
    labels (class-order space). The store is shared, never copied, by the pool, its plain twin and the task sets."""

    def __init__(self, store: Any, source_index: Tensor, labels: Tensor,
                 transform: Optional[Callable] = None) -> None:
        if len(source_index) != len(labels):
            raise ValueError(f"{len(source_index)} items but {len(labels)} labels")
        self.store, self.source_index, self.labels, self.transform = store, source_index, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        image = self.store[int(self.source_index[index])]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]

    def select(self, mask: Tensor, transform: Optional[Callable] = None) -> "RelabelledItems":
        """The items where ``mask`` is true, in the same order, with ``transform``."""
        return RelabelledItems(self.store, self.source_index[mask], self.labels[mask], transform)


class RawSplit(NamedTuple):
    """One split of a source before relabelling: items ``store[source_index]`` of original class ids ``labels``."""

    store: Any
    source_index: Tensor
    labels: Tensor


# ---- the base -------------------------------------------------------------------------------------------------------

class ClassIncrementalDataModule(ZooDataModule):
    """A class-incremental benchmark: the task layout, the relabelled splits, and loaders for the tasks the model
    asks for (see the module docstring for the protocol).

    Subclasses provide the dataset: ``_class_names_by_id()`` (names of the original ids ``0 .. K-1``),
    ``_base_class_order()`` (the order before ``class_order_seed``), ``_raw_splits()`` (train/val/test items with
    original labels) and the transforms.

    Args:
        num_tasks: number of tasks; must divide the classes unless ``first_task_classes`` is given.
        first_task_classes: classes of the first task; the rest are split equally over the other tasks.
        class_order_seed: shuffle the class order with this seed (``None``: keep it).
        shuffle_seed: draw every epoch's batches from ``shuffle_seed + epoch`` (``RandomBatchSampler``'s ``seed``), as
            DDP does, so that one process with batch ``2b`` sees what two ranks with ``b`` see together (``None``:
            torch's global RNG with one process, ``seed_everything`` under DDP).
        batch_size, eval_batch_size, num_workers, pin_memory, predict_dir: see ``ZooDataModule``.
    """

    def __init__(self, *, num_tasks: int, first_task_classes: Optional[int] = None,
                 class_order_seed: Optional[int] = None, shuffle_seed: Optional[int] = None, batch_size: int = 64,
                 eval_batch_size: Optional[int] = None, num_workers: int = 0, pin_memory: bool = False,
                 predict_dir: Optional[str] = None) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, predict_dir=predict_dir)
        self.num_tasks, self.first_task_classes, self.class_order_seed = num_tasks, first_task_classes, class_order_seed
        self.shuffle_seed = shuffle_seed
        self._layout: Optional[TaskLayout] = None
        self.train_pool: Optional[RelabelledItems] = None
        self.train_pool_plain: Optional[RelabelledItems] = None
        self.train_pool_labels: Optional[Tensor] = None
        self._eval_items: dict[str, RelabelledItems] = {}
        self._explicit_request: Optional[dict[str, Any]] = None
        self._explicit_seen: Optional[int] = None

    # ---- what subclasses provide ------------------------------------------------------------------------------------

    def _class_names_by_id(self) -> list[str]:
        """Names of the dataset's original class ids ``0 .. K-1`` (their number is the number of classes)."""
        raise NotImplementedError(f"{type(self).__name__} must define _class_names_by_id (a source of the base class)")

    def _base_class_order(self) -> Optional[Sequence[int]]:
        """The class order before ``class_order_seed`` (``None``: the natural order ``0 .. K-1``)."""
        return None

    def _raw_splits(self) -> dict[str, RawSplit]:
        """``{"train": ..., "val": ..., "test": ...}`` with original class ids."""
        raise NotImplementedError(f"{type(self).__name__} must define _raw_splits (a source of the base class)")

    def train_transform(self) -> Optional[Callable]:
        return None

    def eval_transform(self) -> Optional[Callable]:
        return None

    def _shuffle_class_order(self, order: list[int], seed: int) -> list[int]:
        """The seeded permutation of the class order (``numpy.random.default_rng(seed).permutation``)."""
        return [int(c) for c in np.random.default_rng(seed).permutation(order)]

    # ---- the layout -------------------------------------------------------------------------------------------------

    @property
    def layout(self) -> TaskLayout:
        """The task layout, resolved on first use (an ImageFolder source reads its class folders then)."""
        if self._layout is None:
            num_classes = len(self._class_names_by_id())
            order = self._base_class_order()
            order = list(range(num_classes)) if order is None else [int(c) for c in order]
            if self.class_order_seed is not None:
                order = self._shuffle_class_order(order, self.class_order_seed)
            self._layout = task_layout(num_classes, self.num_tasks, order, self.first_task_classes)
        return self._layout

    @property
    def num_classes(self) -> int:
        return len(self.layout.class_order)

    @property
    def class_order(self) -> list[int]:
        return list(self.layout.class_order)

    @property
    def task_classes(self) -> list[int]:
        return list(self.layout.task_classes)

    @property
    def task_offsets(self) -> list[int]:
        return list(self.layout.task_offsets)

    @property
    def class_names(self) -> list[str]:
        """Class names in class-order space (the name of global label 0 first)."""
        names = self._class_names_by_id()
        return [names[c] for c in self.layout.class_order]

    def task_of_label(self, labels: Tensor) -> Tensor:
        """The task of every global label (same shape and device): the last task whose offset is ≤ the label."""
        labels = torch.as_tensor(labels)
        offsets = torch.tensor(self.layout.task_offsets, dtype=labels.dtype, device=labels.device)
        return torch.searchsorted(offsets, labels.contiguous(), right=True) - 1

    def _to_global(self, original: Tensor) -> Tensor:
        """Original class ids → global labels (position in the class order)."""
        lookup = torch.empty(self.num_classes, dtype=torch.int64)
        lookup[torch.tensor(self.layout.class_order)] = torch.arange(self.num_classes)
        original = torch.as_tensor(original, dtype=torch.int64)
        if len(original) and (original.min() < 0 or original.max() >= self.num_classes):
            raise ValueError(f"{type(self).__name__}: labels {int(original.min())}..{int(original.max())} outside the "
                             f"{self.num_classes} classes")
        return lookup[original]

    # ---- setup ------------------------------------------------------------------------------------------------------

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_pool is not None:
            return  # the splits do not depend on the stage: read them once
        raw = self._raw_splits()
        train = RelabelledItems(raw["train"].store, raw["train"].source_index, self._to_global(raw["train"].labels))
        everything = torch.ones(len(train), dtype=torch.bool)
        self.train_pool = train.select(everything, self.train_transform())
        self.train_pool_plain = train.select(everything, self.eval_transform())
        self.train_pool_labels = self.train_pool.labels
        self._eval_items = {split: RelabelledItems(raw[split].store, raw[split].source_index,
                                                   self._to_global(raw[split].labels), self.eval_transform())
                            for split in ("val", "test")}
        # The whole splits, for code that reads train_set / val_set / test_set (joint training, predict).
        self.train_set, self.val_set, self.test_set = self.train_pool, self._eval_items["val"], self._eval_items["test"]

    def _require_setup(self) -> RelabelledItems:
        if self.train_pool is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() first")
        return self.train_pool

    def train_indices(self, tasks: Sequence[int]) -> Tensor:
        """Pool indices (sorted, int64) of the training items of ``tasks``."""
        self._require_setup()
        tasks = self._check_tasks(tasks)
        return torch.nonzero(torch.isin(self.task_of_label(self.train_pool_labels), tasks)).flatten()

    def task_set(self, split: str, task: int) -> RelabelledItems:
        """The ``split`` ("val" or "test") items of ``task`` only, evaluation transform, ``(image, global label)``."""
        self._require_setup()
        if split not in self._eval_items:
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        self._check_tasks([task])
        items = self._eval_items[split]
        return items.select(self.task_of_label(items.labels) == task, items.transform)

    def _check_tasks(self, tasks: Sequence[int]) -> Tensor:
        tasks = torch.as_tensor(list(tasks), dtype=torch.int64)
        if len(tasks) and (tasks.min() < 0 or tasks.max() >= self.num_tasks):
            raise ValueError(f"tasks {tasks.tolist()} outside 0..{self.num_tasks - 1}")
        return tasks

    # ---- which tasks the loaders serve ------------------------------------------------------------------------------

    def set_request(self, tasks: Sequence[int], extra_indices: Optional[Sequence[int] | Tensor] = None) -> None:
        """What to train on when the LightningModule does not say (tests, notebooks): ``tasks`` plus the pool items
        ``extra_indices`` (exemplars)."""
        self._explicit_request = {"tasks": list(tasks), "extra_indices": extra_indices}

    def set_seen(self, num_seen_tasks: int) -> None:
        """How many tasks validation and test cover when the LightningModule does not say."""
        self._explicit_seen = int(num_seen_tasks)

    def _lightning_module(self) -> Any:
        trainer = getattr(self, "trainer", None)
        return trainer.lightning_module if trainer is not None else None

    def current_request(self) -> tuple[list[int], Tensor]:
        """``(tasks, extra pool indices)`` of the next training loader: the module's ``training_request()`` when it
        has one, else ``set_request``'s, else every task and no extra item."""
        module = self._lightning_module()
        request = module.training_request() if hasattr(module, "training_request") else self._explicit_request
        if request is None:
            return list(range(self.num_tasks)), torch.zeros(0, dtype=torch.int64)
        tasks = self._check_tasks(request["tasks"]).tolist()
        extra = request.get("extra_indices")
        extra = torch.zeros(0, dtype=torch.int64) if extra is None else torch.as_tensor(extra, dtype=torch.int64).flatten()
        pool_size = len(self._require_setup())
        if len(extra) and (extra.min() < 0 or extra.max() >= pool_size):
            raise ValueError(f"extra_indices {int(extra.min())}..{int(extra.max())} outside the training pool of "
                             f"{pool_size} items")
        return tasks, extra

    def current_seen_tasks(self) -> int:
        """How many tasks (``0 .. n-1``) validation and test cover: the module's ``seen_tasks()`` when it has one,
        else ``set_seen``'s, else all."""
        module = self._lightning_module()
        if hasattr(module, "seen_tasks"):
            seen = int(module.seen_tasks())
        else:
            seen = self.num_tasks if self._explicit_seen is None else self._explicit_seen
        if not 1 <= seen <= self.num_tasks:
            raise ValueError(f"seen tasks must be in 1..{self.num_tasks}, got {seen}")
        return seen

    # ---- loaders ----------------------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the requested tasks' training items and the extra items, each item once (an exemplar
        that is also current-task data is not doubled), sharded over DDP ranks by ``RandomBatchSampler``."""
        pool = self._require_setup()
        tasks, extra = self.current_request()
        indices = torch.unique(torch.cat([self.train_indices(tasks), extra]))  # sorted, duplicates removed
        if not len(indices):
            raise ValueError(f"{type(self).__name__}: nothing to train on (tasks {tasks}, {len(extra)} extra items)")
        rank, world = self._world()
        return self.batch_sampler_loader(Subset(pool, indices.tolist()),
                                         RandomBatchSampler(len(indices), self.batch_size, seed=self.shuffle_seed,
                                                            rank=rank, world_size=world))

    def evaluation_sets(self, split: str) -> list[Dataset]:
        """One set per seen task (``dataloader_idx`` = task id); ``predict`` reads the test sets."""
        split = "test" if split == "predict" else split
        return [self.task_set(split, task) for task in range(self.current_seen_tasks())]

    def val_dataloader(self) -> list[DataLoader]:
        return [self.eval_loader(dataset) for dataset in self.evaluation_sets("val")]

    def test_dataloader(self) -> list[DataLoader]:
        return [self.eval_loader(dataset) for dataset in self.evaluation_sets("test")]


# ---- sources --------------------------------------------------------------------------------------------------------

class DigitsClassIncrementalDataModule(ClassIncrementalDataModule):
    """scikit-learn's digits as 5 tasks × 2 classes (the zoo's embedded class-incremental benchmark, no download).

    The 1,797 digits are split 70/10/20 train/val/test, stratified per class (``datamodules.digits.split_indices``),
    so every task's splits hold its classes in proportion. Images are the 8×8 originals in [0, 1] (``image_size`` 8),
    as the MLP of the class-incremental digits experiments reads raw pixels.

    Args:
        num_tasks, first_task_classes, class_order_seed: see ``ClassIncrementalDataModule``; the seed permutes the
            order with ``numpy.random.default_rng(seed).permutation``.
        class_order: the digits in the order they are learned (default ``0 .. 9``).
        image_size: side after bilinear resizing of the 8×8 originals.
        channels: 1 (grey) or 3 (grey repeated).
        val_fraction, test_fraction: shares of all images held out for validation and test.
        split_seed: seed of the stratified split.
        augment: random affine jitter on training images (±10°, ±10 % shift, 0.9–1.1 scale; never flips).
        batch_size, eval_batch_size, num_workers, pin_memory, predict_dir: see ``ZooDataModule``.
    """

    def __init__(self, *, num_tasks: int = 5, first_task_classes: Optional[int] = None,
                 class_order: Optional[list[int]] = None, class_order_seed: Optional[int] = None,
                 shuffle_seed: Optional[int] = None, image_size: int = 8, channels: int = 1, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 split_seed: int = 0, augment: bool = False, batch_size: int = 32,
                 eval_batch_size: Optional[int] = None, num_workers: int = 0, pin_memory: bool = False,
                 predict_dir: Optional[str] = None) -> None:
        super().__init__(num_tasks=num_tasks, first_task_classes=first_task_classes,
                         class_order_seed=class_order_seed, shuffle_seed=shuffle_seed, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, pin_memory=pin_memory, predict_dir=predict_dir)
        self.given_class_order = class_order
        self.image_size, self.channels, self.augment = image_size, channels, augment
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.predict_image_mode = "L" if channels == 1 else "RGB"
        _ = self.layout  # a wrong num_tasks or class_order fails here, not at the first loader

    def _class_names_by_id(self) -> list[str]:
        return [str(digit) for digit in range(10)]

    def _base_class_order(self) -> Optional[Sequence[int]]:
        return self.given_class_order

    def _raw_splits(self) -> dict[str, RawSplit]:
        images, labels = load_digit_images(self.image_size, self.channels)
        store = TensorImages(images)
        splits = split_indices(labels.numpy(), self.val_fraction, self.test_fraction, self.split_seed)
        return {name: RawSplit(store, torch.from_numpy(index), labels[torch.from_numpy(index)])
                for name, index in zip(("train", "val", "test"), splits)}

    def train_transform(self) -> Optional[Callable]:
        return v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)) if self.augment else None

    def predict_transform(self) -> Callable:
        return digit_image_transform(self.image_size)


class CIFAR100ClassIncrementalDataModule(ClassIncrementalDataModule):
    """CIFAR-100 as ANCL and FACIL train on it: ``cifar100_icarl``, 10 tasks × 10 classes (or 5 × 20).

    Reads ``<root>/cifar-100-python/{train,test,meta}`` (``datamodules.cifar.open_cifar``; nothing is downloaded unless
    ``download: true``). Validation is a seeded ``val_fraction`` of every class's training images (FACIL's
    ``get_loaders(validation=.1)``, which rounds per class); the test split is the official test set.

    Transforms: training pads 4, crops 32 at random and flips horizontally (``augment: true``, the usual CIFAR
    augmentation), or, with ``augment: facil``, what FACIL's ``get_transforms`` (and ANCL's fork of it) applies:
    ``Pad(4)`` then ``RandomResizedCrop(32)`` (scale 0.08–1, a much stronger crop) and the flip. Then both normalise
    with FACIL's CIFAR-100 statistics; evaluation only normalises (FACIL's ``Pad(4)`` + ``CenterCrop(32)`` is the
    identity).

    Args:
        root: folder holding ``cifar-100-python/``.
        download: fetch the dataset into ``root`` in ``prepare_data`` if missing (needs internet).
        num_tasks, first_task_classes: see ``ClassIncrementalDataModule``.
        class_order: ``"icarl"`` (FACIL's ``cifar100_icarl``), ``"natural"`` (0..99) or a list of the 100 ids.
        class_order_seed: shuffle the chosen order FACIL-style (``np.random.seed(seed); np.random.shuffle(order)``,
            with a private ``RandomState``).
        val_fraction: share of each class's training images held out for validation.
        split_seed: seed of that hold-out.
        augment: ``true`` (padded random crop + flip), ``"facil"`` (FACIL's pad + random-resized crop + flip) or
            ``false``.
        batch_size, eval_batch_size, num_workers, pin_memory, predict_dir: see ``ZooDataModule``.
    """

    mean = (0.5071, 0.4866, 0.4409)
    std = (0.2009, 0.1984, 0.2023)

    def __init__(self, *, root: str = "data/cifar100", download: bool = False, num_tasks: int = 10,
                 first_task_classes: Optional[int] = None,
                 class_order: Union[Literal["icarl", "natural"], list[int]] = "icarl",
                 class_order_seed: Optional[int] = None, shuffle_seed: Optional[int] = None, val_fraction: float = 0.1, split_seed: int = 0,
                 augment: Union[bool, Literal["facil"]] = True, batch_size: int = 128, eval_batch_size: Optional[int] = None,
                 num_workers: int = 4, pin_memory: bool = True, predict_dir: Optional[str] = None) -> None:
        super().__init__(num_tasks=num_tasks, first_task_classes=first_task_classes,
                         class_order_seed=class_order_seed, shuffle_seed=shuffle_seed, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, pin_memory=pin_memory, predict_dir=predict_dir)
        if isinstance(class_order, str) and class_order not in ("icarl", "natural"):
            raise ValueError(f"class_order must be 'icarl', 'natural' or a list of the 100 class ids, got {class_order!r}")
        self.root, self.download = Path(root), download
        self.given_class_order = class_order
        if augment not in (True, False, "facil"):
            raise ValueError(f"augment must be true, false or 'facil', got {augment!r}")
        self.val_fraction, self.split_seed, self.augment = val_fraction, split_seed, augment
        self._names: Optional[list[str]] = None
        _ = self.layout  # a wrong num_tasks or class_order fails here, not at the first loader

    def prepare_data(self) -> None:
        if self.download:
            download_cifar(self.root, "CIFAR100")

    def _class_names_by_id(self) -> list[str]:
        """The release's fine label names once read (``setup``, or a meta file already on disk), else the ids."""
        if self._names is None:
            meta = self.root / CIFAR_FOLDERS["CIFAR100"] / "meta"
            if not meta.is_file():
                return [str(c) for c in range(100)]
            self._names = list(load_cifar_pickle(meta)["fine_label_names"])
        return self._names

    def _base_class_order(self) -> Optional[Sequence[int]]:
        if self.given_class_order == "icarl":
            return CIFAR100_ICARL_CLASS_ORDER
        return None if self.given_class_order == "natural" else self.given_class_order

    def _shuffle_class_order(self, order: list[int], seed: int) -> list[int]:
        order = list(order)
        np.random.RandomState(seed).shuffle(order)  # the stream of np.random.seed(seed); np.random.shuffle(order)
        return order

    def _raw_splits(self) -> dict[str, RawSplit]:
        splits = {}
        for name, train in (("train", True), ("test", False)):
            dataset = open_cifar(self.root, "CIFAR100", train)
            images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
            labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
            splits[name] = RawSplit(TensorImages(images), torch.arange(len(labels)), labels)
            self._names = list(dataset.classes)
        train = splits["train"]
        held = per_class_holdout(train.labels, self.val_fraction, self.split_seed)
        splits["val"] = RawSplit(train.store, train.source_index[held], train.labels[held])
        splits["train"] = RawSplit(train.store, train.source_index[~held], train.labels[~held])
        return splits

    def _to_float(self) -> list[Callable]:
        return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def train_transform(self) -> Callable:
        if self.augment == "facil":
            augment = [v2.Pad(4), v2.RandomResizedCrop(32, antialias=True), v2.RandomHorizontalFlip()]
        elif self.augment:
            augment = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
        else:
            augment = []
        return v2.Compose([v2.ToImage(), *augment, *self._to_float()])

    def eval_transform(self) -> Callable:
        return v2.Compose([v2.ToImage(), *self._to_float()])

    def predict_transform(self) -> Callable:
        return v2.Compose([v2.ToImage(), v2.Resize(32, antialias=True), v2.CenterCrop(32), *self._to_float()])


_FOLDER_LAYOUT = """\
  <root>/train/<class_name>/<image>.jpg|.png|...   (training images; a seeded val_fraction of them validates)
  <root>/val/<class_name>/...                      (the test split; class folders named as in train/)"""


class ImageFolderClassIncrementalDataModule(ClassIncrementalDataModule):
    """Any class-folder tree as a class-incremental benchmark (Tiny ImageNet, ImageNet-subset, one's own data).

    The original class ids are the positions of the ``train/`` folder names in sorted order (torchvision's
    ``ImageFolder``); ``val/`` is the test split and a seeded ``val_fraction`` of each class's training images is the
    validation split. Transforms are ``ImageFolderDataModule``'s: ``RandomResizedCrop`` + flip for training, resize
    to ``image_size / crop_pct`` + centre crop for evaluation, ImageNet normalisation. The class folders are read when
    the layout is first needed (``num_classes``, ``class_order``, ``setup``), which fails with the expected layout
    when the tree is missing.

    Args:
        root: dataset root holding the split folders.
        num_tasks, first_task_classes: see ``ClassIncrementalDataModule``.
        class_order: class folder names or original ids, in the order they are learned (default: sorted names).
        class_order_seed: permute the order with ``numpy.random.default_rng(seed).permutation``.
        val_fraction: share of each class's training images held out for validation.
        split_seed: seed of that hold-out.
        image_size, crop_pct, mean, std: the crops and the normalisation.
        train_dir, test_dir: split folder names under ``root``.
        batch_size, eval_batch_size, num_workers, pin_memory, predict_dir: see ``ZooDataModule``.
    """

    def __init__(self, *, root: str, num_tasks: int = 10, first_task_classes: Optional[int] = None,
                 class_order: Optional[list[Union[int, str]]] = None, class_order_seed: Optional[int] = None,
                 shuffle_seed: Optional[int] = None, val_fraction: float = 0.1, split_seed: int = 0, image_size: int = 224, crop_pct: float = 0.875,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 train_dir: str = "train", test_dir: str = "val", batch_size: int = 64,
                 eval_batch_size: Optional[int] = None, num_workers: int = 4, pin_memory: bool = True,
                 predict_dir: Optional[str] = None) -> None:
        super().__init__(num_tasks=num_tasks, first_task_classes=first_task_classes,
                         class_order_seed=class_order_seed, shuffle_seed=shuffle_seed, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, pin_memory=pin_memory, predict_dir=predict_dir)
        self.root = Path(root)
        self.given_class_order = class_order
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.image_size, self.crop_pct = image_size, crop_pct
        self.mean, self.std = tuple(mean), tuple(std)
        self.split_dirs = {"train": train_dir, "test": test_dir}
        self._folder_names: Optional[list[str]] = None

    def _split_root(self, split: str) -> Path:
        return require_path(self.root / self.split_dirs[split], f"class-incremental ImageFolder split '{split}'",
                            _FOLDER_LAYOUT, "arrange your images in class sub-folders, or point "
                            "`data.init_args.root` at such a tree")

    def _folder_classes(self, split: str) -> list[str]:
        """The sorted class folder names of ``split``."""
        path = self._split_root(split)
        try:
            return find_classes(str(path))[0]
        except FileNotFoundError as err:  # torchvision's error for a split without class folders
            raise FileNotFoundError(f"{err}\nExpected layout:\n{_FOLDER_LAYOUT}") from err

    def _class_names_by_id(self) -> list[str]:
        if self._folder_names is None:
            self._folder_names = self._folder_classes("train")
        return self._folder_names

    def _base_class_order(self) -> Optional[Sequence[int]]:
        if self.given_class_order is None:
            return None
        names = self._class_names_by_id()
        index = {name: i for i, name in enumerate(names)}
        unknown = [c for c in self.given_class_order if isinstance(c, str) and c not in index]
        if unknown:
            raise ValueError(f"class_order names folders that are not in '{self.root / self.split_dirs['train']}': "
                             f"{unknown[:5]}")
        return [index[c] if isinstance(c, str) else int(c) for c in self.given_class_order]

    def _samples(self, split: str, class_to_idx: dict[str, int]) -> tuple[list[str], Tensor]:
        try:
            samples = make_dataset(str(self._split_root(split)), class_to_idx, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as err:  # torchvision's error for a class folder without images
            raise FileNotFoundError(f"{err}\nExpected layout:\n{_FOLDER_LAYOUT}") from err
        return [path for path, _ in samples], torch.tensor([label for _, label in samples], dtype=torch.int64)

    def _raw_splits(self) -> dict[str, RawSplit]:
        names = self._class_names_by_id()
        class_to_idx = {name: i for i, name in enumerate(names)}
        test_root = self._split_root("test")
        test_names = self._folder_classes("test")
        unknown = sorted(set(test_names) - set(names))
        if unknown:
            raise ValueError(f"'{test_root}' has class folders that '{self.root / self.split_dirs['train']}' lacks: "
                             f"{unknown[:5]}{'...' if len(unknown) > 5 else ''}; the test classes must be training "
                             "classes")
        train_paths, train_labels = self._samples("train", class_to_idx)
        test_paths, test_labels = self._samples("test", {name: class_to_idx[name] for name in test_names})
        train_store = ImageFiles(train_paths)
        held = per_class_holdout(train_labels, self.val_fraction, self.split_seed)
        every = torch.arange(len(train_labels))
        return {"train": RawSplit(train_store, every[~held], train_labels[~held]),
                "val": RawSplit(train_store, every[held], train_labels[held]),
                "test": RawSplit(ImageFiles(test_paths), torch.arange(len(test_labels)), test_labels)}

    def _to_float(self) -> list[Callable]:
        return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def train_transform(self) -> Callable:
        return v2.Compose([v2.RandomResizedCrop(self.image_size, antialias=True), v2.RandomHorizontalFlip(),
                           *self._to_float()])

    def eval_transform(self) -> Callable:
        resize = int(round(self.image_size / self.crop_pct))
        return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(self.image_size), *self._to_float()])

    def predict_transform(self) -> Callable:
        return self.eval_transform()
