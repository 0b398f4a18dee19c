"""Labeled + unlabeled data for semi-supervised classification (UDA, Meta Pseudo Labels, Entropy Minimization).

Every training step gets ``B`` labeled images and ``μB`` unlabeled ones, each unlabeled image as a weak view (shift /
flip) and a strong view (RandAugment + Cutout, as in UDA and FixMatch). A training batch is

    {"labeled": (x_l (B, C, H, W), y_l (B,)), "unlabeled": ((x_weak, x_strong) (μB, C, H, W) each, y_hidden (μB,))}

``y_hidden`` is the true label of each unlabeled image (``-1`` where there is none, as in STL-10's unlabeled split);
methods only log it (pseudo-label accuracy), never train on it.

The labeled split is class-balanced and seeded (``labeled_split``); as in UDA, MPL and USB the unlabeled set is the
whole training set by default (``unlabeled_includes_labeled``). Evaluation is on the test split, the classic protocol
(there is no validation split; report the last checkpoint, not the best on test).

``zoo predict`` runs on the test split, or with ``predict_dir`` on a folder of one's own images read as the test split
is (``predict_transform``).

The two streams come from ``ZooDataModule.two_stream_loader``: under DDP each rank draws disjoint images at every
step, all ranks get the same number of steps, and a run resumed mid-epoch continues both streams where they were. An
epoch is one pass over the unlabeled set; the labeled set is cycled within it, reshuffled at every pass. Classic SSL
recipes are step-based: use ``trainer.max_steps``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from datamodules.base import ZooDataModule, require_path
from datamodules.cifar import download_cifar, open_cifar
from datamodules.digits import TensorImageDataset, digit_image_transform, load_digit_images

__all__ = [
    "labeled_split", "Cutout", "GaussianNoise", "RandomMagnitudeRandAugment", "TwoViewDataset",
    "SemiSupervisedDataModule", "DigitsSemiSupDataModule", "NaturalImageSemiSupDataModule", "CIFAR10SemiSupDataModule",
    "CIFAR100SemiSupDataModule", "SVHNSemiSupDataModule", "STL10SemiSupDataModule",
]


def labeled_split(targets: np.ndarray, num_per_class: int, num_classes: int, seed: int) -> np.ndarray:
    """Sorted indices of exactly ``num_per_class`` images of every class, drawn with ``default_rng(seed)``."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(targets == c)
        if len(members) < num_per_class:
            raise ValueError(f"class {c} has {len(members)} training images, fewer than num_labels_per_class="
                             f"{num_per_class}")
        chosen.append(rng.choice(members, num_per_class, replace=False))
    return np.sort(np.concatenate(chosen))


class Cutout(nn.Module):
    """Zero a ``size × size`` square at a uniformly random centre, clipped at the borders (DeVries & Taylor 2017;
    UDA's ``cutout_numpy``). ``size`` is in pixels, or a fraction of the shorter side when it is a float < 1."""

    def __init__(self, size: float, fill: float = 0.0) -> None:
        super().__init__()
        self.size, self.fill = size, fill

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        side = int(round(self.size * min(h, w))) if self.size < 1 else int(self.size)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(0, cy - side // 2), min(h, cy - side // 2 + side)
        x0, x1 = max(0, cx - side // 2), min(w, cx - side // 2 + side)
        image = image.clone()
        image[..., y0:y1, x0:x1] = self.fill
        return image


class GaussianNoise(nn.Module):
    """Add ``N(0, σ²)`` noise to a float image in [0, 1] and clip back to [0, 1]."""

    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image + self.sigma * torch.randn_like(image)).clamp_(0, 1)


class RandomMagnitudeRandAugment(nn.Module):
    """``v2.RandAugment`` with ``num_ops`` operations at a magnitude drawn uniformly from ``1..max_magnitude`` for every
    image, as UDA's and FixMatch's RandAugment do (a fixed magnitude would need tuning per dataset)."""

    def __init__(self, num_ops: int = 2, max_magnitude: int = 10, num_magnitude_bins: int = 11) -> None:
        super().__init__()
        self.max_magnitude = max_magnitude
        self.augment = v2.RandAugment(num_ops=num_ops, magnitude=1, num_magnitude_bins=num_magnitude_bins)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        self.augment.magnitude = int(torch.randint(1, self.max_magnitude + 1, ()))
        return self.augment(image)


class TwoViewDataset(Dataset):
    """Item ``i`` of ``base`` as ``((weak(x), strong(x)), target)``: two independent augmentations of one image."""

    def __init__(self, base: Dataset, weak: Callable, strong: Callable) -> None:
        self.base, self.weak, self.strong = base, weak, strong

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, target = self.base[i]
        return (self.weak(image), self.strong(image)), target


class SemiSupervisedDataModule(ZooDataModule):
    """The labeled / unlabeled / test plumbing; subclasses load the images and define the three transforms.

    Args:
        num_labels_per_class: labeled images of each class (``None``: every training image is labeled, STL-10).
        mu: unlabeled images per labeled one in a step (``μ``; 7 in UDA, FixMatch and MPL).
        unlabeled_includes_labeled: the unlabeled set is the whole training set (UDA, MPL, USB) rather than the rest.
        split_seed: seed of the labeled split.
        seed: seed of the batch order (with the epoch).
        batch_size: labeled images per step and process (the unlabeled batch is ``μ × batch_size``).
        eval_batch_size: default ``4 × batch_size``.
        num_workers, pin_memory, predict_dir: see ``ZooDataModule``.

    Subclasses implement ``_load(split) -> (images uint8|float (N, C, H, W), targets (N,))`` for ``"train"`` and
    ``"test"`` (and ``"extra_unlabeled"`` when ``has_extra_unlabeled()``, targets ``-1``), and ``weak_transform``,
    ``strong_transform``, ``eval_transform`` on single image tensors, and ``predict_transform`` on a PIL image of
    ``predict_dir``.
    """

    num_classes: int = 10
    class_names: Sequence[str] = ()

    def __init__(
        self,
        *,
        num_labels_per_class: Optional[int] = 400,
        mu: int = 7,
        unlabeled_includes_labeled: bool = True,
        split_seed: int = 0,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        predict_dir: Optional[str] = None,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size or 4 * batch_size,
                         num_workers=num_workers, pin_memory=pin_memory, predict_dir=predict_dir)
        if mu < 1:
            raise ValueError(f"mu must be >= 1, got {mu}")
        self.num_labels_per_class, self.mu = num_labels_per_class, mu
        self.unlabeled_includes_labeled, self.split_seed, self.seed = unlabeled_includes_labeled, split_seed, seed
        self.labeled_set: Optional[Dataset] = None
        self.unlabeled_set: Optional[Dataset] = None
        self.labeled_indices: Optional[np.ndarray] = None
        self.unlabeled_indices: Optional[np.ndarray] = None

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _load(split)")

    def has_extra_unlabeled(self) -> bool:
        return False

    def weak_transform(self) -> Callable:
        raise NotImplementedError(f"{type(self).__name__} must implement weak_transform()")

    def strong_transform(self) -> Callable:
        raise NotImplementedError(f"{type(self).__name__} must implement strong_transform()")

    def eval_transform(self) -> Callable:
        raise NotImplementedError(f"{type(self).__name__} must implement eval_transform()")

    def setup(self, stage: Optional[str] = None) -> None:
        if self.test_set is not None:
            return
        images, targets = self._load("train")
        test_images, test_targets = self._load("test")
        if self.num_labels_per_class is None:
            labeled = np.arange(len(targets))
        else:
            labeled = labeled_split(targets.numpy(), self.num_labels_per_class, self.num_classes, self.split_seed)
        unlabeled = (np.arange(len(targets)) if self.unlabeled_includes_labeled
                     else np.setdiff1d(np.arange(len(targets)), labeled))
        self.labeled_indices, self.unlabeled_indices = labeled, unlabeled
        self.labeled_set = TensorImageDataset(images[labeled], targets[labeled], self.weak_transform())
        u_images, u_targets = images[unlabeled], targets[unlabeled]
        if self.has_extra_unlabeled():
            extra_images, extra_targets = self._load("extra_unlabeled")
            u_images, u_targets = torch.cat([u_images, extra_images]), torch.cat([u_targets, extra_targets])
        self.unlabeled_set = TwoViewDataset(TensorImageDataset(u_images, u_targets), self.weak_transform(),
                                            self.strong_transform())
        if len(self.unlabeled_set) == 0:
            raise ValueError("the unlabeled set is empty: set unlabeled_includes_labeled: true or label fewer images")
        self.test_set = self.val_set = TensorImageDataset(test_images, test_targets, self.eval_transform())

    def train_dataloader(self) -> CombinedLoader:
        if self.labeled_set is None or self.unlabeled_set is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before train_dataloader()")
        _, world = self._world()
        unlabeled_batch = self.mu * self.batch_size
        num_batches = len(self.unlabeled_set) // (unlabeled_batch * world)
        if num_batches == 0:
            raise ValueError(f"{len(self.unlabeled_set)} unlabeled images cannot fill one step of {unlabeled_batch} × "
                             f"{world} ranks: lower batch_size or mu")
        return self.two_stream_loader({"labeled": (self.labeled_set, self.batch_size),
                                       "unlabeled": (self.unlabeled_set, unlabeled_batch)}, num_batches, self.seed)


def _float_normalized(mean: Sequence[float], std: Sequence[float]) -> list[Callable]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


class DigitsSemiSupDataModule(SemiSupervisedDataModule):
    """The embedded default: scikit-learn's 1,797 digits, no download.

    A stratified 70/30 split (``split_seed``) gives a 1,257-image training pool and 540 test images; 5 labels per
    class by default, every pool image unlabeled. Views at ``image_size`` (default 16, bilinear from 8×8), without
    flips (digits are not mirror symmetric):

    * weak: a random shift of up to one original pixel (``image_size / 8``), zero fill;
    * strong: random affine (±15°, ±1 original pixel, scale 0.85–1.15, shear ±10°), Gaussian noise σ = 0.1 and a
      Cutout of 3/8 of the side. RandAugment's colour operations mean little on 17 grey levels.

    ``pixel_arrays(split)`` returns the raw 64-pixel vectors of ``"labeled"``, ``"unlabeled"`` or ``"test"`` for the
    classical baselines (``zoo.semisup.baselines``). ``predict_dir`` images are read grey and resized to
    ``image_size`` like the test split (light ink on a dark background, as scikit-learn's digits).
    """

    class_names = tuple(str(d) for d in range(10))
    predict_image_mode = "L"

    def __init__(self, *, image_size: int = 16, num_labels_per_class: Optional[int] = 5, batch_size: int = 16,
                 eval_batch_size: Optional[int] = 256, num_workers: int = 0, pin_memory: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(num_labels_per_class=num_labels_per_class, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, pin_memory=pin_memory, **kwargs)
        self.image_size = image_size
        self._data: Optional[dict] = None

    def _prepare(self) -> dict:
        if self._data is None:
            from sklearn.datasets import load_digits

            images, labels = load_digit_images(self.image_size, channels=1)
            pixels = load_digits().data.astype(np.float32)
            pool, test = train_test_split(np.arange(len(labels)), test_size=0.3, stratify=labels.numpy(),
                                          random_state=self.split_seed)
            pool, test = np.sort(pool), np.sort(test)
            self._data = {"images": images, "labels": labels, "pixels": pixels, "train": pool, "test": test}
        return self._data

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = self._prepare()
        index = torch.from_numpy(data[split])
        return data["images"][index], data["labels"][index]

    def weak_transform(self) -> Callable:
        shift = max(1, self.image_size // 8)
        return v2.RandomCrop(self.image_size, padding=shift, fill=0)

    def strong_transform(self) -> Callable:
        shift = max(1, self.image_size // 8) / self.image_size
        return v2.Compose([v2.RandomAffine(degrees=15, translate=(shift, shift), scale=(0.85, 1.15), shear=10),
                           GaussianNoise(0.1), Cutout(0.375)])

    def eval_transform(self) -> Callable:
        return nn.Identity()

    def predict_transform(self) -> Callable:
        return digit_image_transform(self.image_size)

    def pixel_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Raw 8×8 pixels ``(N, 64)`` and labels of ``labeled``, ``unlabeled`` or ``test`` (the same images)."""
        data = self._prepare()
        if split == "test":
            index = data["test"]
        else:
            if self.labeled_indices is None:
                self.setup()
            within = self.labeled_indices if split == "labeled" else self.unlabeled_indices
            index = data["train"][within]
        return data["pixels"][index], data["labels"].numpy()[index]


class NaturalImageSemiSupDataModule(SemiSupervisedDataModule):
    """UDA's and FixMatch's views of natural images, for the sets below (``image_side``, ``mean``/``std``, ``flip``,
    ``crop_padding`` and ``cutout`` are class attributes of each set):

    * weak: reflect-padded random crop (+ horizontal flip);
    * strong: the weak view + RandAugment (2 ops, magnitude drawn from 1..10 per image) + Cutout;
    * evaluation: the image as it is, normalised; a ``predict_dir`` image is first resized (shorter side) and
      centre-cropped to ``image_side``.

    Args:
        root: where the data set lives.
        download: fetch it into ``root`` with torchvision (needs internet; off by default).
        **kwargs: see ``SemiSupervisedDataModule``.
    """

    image_side, flip, crop_padding, cutout = 32, True, 4, 16
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __init__(self, *, root: str, download: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root, self.download = Path(root), download

    def _crop_and_flip(self) -> list[Callable]:
        ops = [v2.RandomCrop(self.image_side, padding=self.crop_padding, padding_mode="reflect")]
        return ops + [v2.RandomHorizontalFlip()] if self.flip else ops

    def weak_transform(self) -> Callable:
        return v2.Compose([*self._crop_and_flip(), *_float_normalized(self.mean, self.std)])

    def strong_transform(self) -> Callable:
        return v2.Compose([*self._crop_and_flip(), RandomMagnitudeRandAugment(), Cutout(self.cutout),
                           *_float_normalized(self.mean, self.std)])

    def eval_transform(self) -> Callable:
        return v2.Compose(_float_normalized(self.mean, self.std))

    def predict_transform(self) -> Callable:
        return v2.Compose([v2.Resize(self.image_side, antialias=True), v2.CenterCrop(self.image_side),
                           *_float_normalized(self.mean, self.std)])


class CIFAR10SemiSupDataModule(NaturalImageSemiSupDataModule):
    """CIFAR-10 from its python pickle batches (``datamodules.cifar``); 4,000 labels (400 per class) by default, as in
    the UDA / MPL tables. Crop padding 4, Cutout 16×16 (UDA's CIFAR recipe)."""

    dataset_name, num_classes = "CIFAR10", 10
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def __init__(self, *, root: str = "data/cifar10", num_labels_per_class: Optional[int] = 400,
                 **kwargs: Any) -> None:
        super().__init__(root=root, num_labels_per_class=num_labels_per_class, **kwargs)

    def prepare_data(self) -> None:
        if self.download:
            download_cifar(self.root, self.dataset_name)

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = open_cifar(self.root, self.dataset_name, train=split == "train")
        self.class_names = list(dataset.classes)  # from the release's meta file
        images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2)
        return images, torch.as_tensor(dataset.targets, dtype=torch.int64)


class CIFAR100SemiSupDataModule(CIFAR10SemiSupDataModule):
    """CIFAR-100 (fine labels); 10,000 labels (100 per class) by default. Same arguments as CIFAR-10's."""

    dataset_name, num_classes = "CIFAR100", 100
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

    def __init__(self, *, root: str = "data/cifar100", num_labels_per_class: Optional[int] = 100,
                 **kwargs: Any) -> None:
        super().__init__(root=root, num_labels_per_class=num_labels_per_class, **kwargs)


_SVHN_LAYOUT = """\
  <root>/train_32x32.mat   (MATLAB: X (32, 32, 3, N) uint8, y (N, 1) with 10 for the digit 0)
  <root>/test_32x32.mat
  <root>/extra_32x32.mat   (optional, with use_extra: true)"""


class SVHNSemiSupDataModule(NaturalImageSemiSupDataModule):
    """SVHN from torchvision's ``.mat`` files; 1,000 labels by default; no flips (digits). ``use_extra`` adds the
    531,131 ``extra`` images to the unlabeled set (USB's protocol), unlabeled."""

    dataset_name, num_classes, flip = "SVHN", 10, False
    class_names = tuple(str(d) for d in range(10))
    mean, std = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)

    def __init__(self, *, root: str = "data/svhn", num_labels_per_class: Optional[int] = 100,
                 use_extra: bool = False, **kwargs: Any) -> None:
        super().__init__(root=root, num_labels_per_class=num_labels_per_class, **kwargs)
        self.use_extra = use_extra

    def has_extra_unlabeled(self) -> bool:
        return self.use_extra

    def prepare_data(self) -> None:
        if self.download:
            from torchvision.datasets import SVHN

            for split in ("train", "test", *(("extra",) if self.use_extra else ())):
                SVHN(str(self.root), split=split, download=True)

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        import scipy.io

        name = {"train": "train", "test": "test", "extra_unlabeled": "extra"}[split]
        path = require_path(self.root / f"{name}_32x32.mat", "SVHN", _SVHN_LAYOUT,
                            "set `data.init_args.download: true` (needs internet), or get the cropped-digits .mat "
                            "files from http://ufldl.stanford.edu/housenumbers/ into <root>")
        try:
            mat = scipy.io.loadmat(path)
            images = torch.from_numpy(np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1))))
            labels = torch.from_numpy(mat["y"].astype(np.int64).reshape(-1) % 10)  # label 10 is the digit 0
        except (ValueError, KeyError, OSError) as err:
            raise RuntimeError(f"SVHN file '{path}' is corrupt or not the cropped-digits format: {err!r}") from err
        if split == "extra_unlabeled":
            labels = torch.full_like(labels, -1)
        return images, labels


_STL_LAYOUT = """\
  <root>/stl10_binary/train_X.bin, train_y.bin   (5,000 labeled 96×96, column-major uint8; labels 1..10)
  <root>/stl10_binary/test_X.bin, test_y.bin     (8,000)
  <root>/stl10_binary/unlabeled_X.bin            (100,000 unlabeled)
  <root>/stl10_binary/fold_indices.txt           (10 predefined folds of 1,000 training images)"""


class STL10SemiSupDataModule(NaturalImageSemiSupDataModule):
    """STL-10 from its binary release: the 5,000 labeled training images (or one predefined ``fold`` of 1,000) and
    the 100,000 unlabeled ones (which also hold classes outside the ten). 96×96, crop padding 12, Cutout 48."""

    dataset_name, folder, num_classes = "STL10", "stl10_binary", 10
    class_names = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")  # class_names.txt
    mean, std = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)
    image_side, crop_padding, cutout = 96, 12, 48

    def __init__(self, *, root: str = "data/stl10", fold: Optional[int] = None,
                 num_labels_per_class: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(root=root, num_labels_per_class=num_labels_per_class, **kwargs)
        if fold is not None and not 0 <= fold <= 9:
            raise ValueError(f"fold must be 0-9, got {fold}")
        self.fold = fold

    def has_extra_unlabeled(self) -> bool:
        return True

    def prepare_data(self) -> None:
        if self.download:
            from torchvision.datasets import STL10

            STL10(str(self.root), split="train+unlabeled", download=True)

    def _read(self, name: str) -> np.ndarray:
        path = require_path(self.root / self.folder / name, "STL10", _STL_LAYOUT,
                            "set `data.init_args.download: true` (needs internet), or unpack stl10_binary.tar.gz "
                            "from https://cs.stanford.edu/~acoates/stl10/ into <root>")
        return np.fromfile(path, dtype=np.uint8)

    def _images(self, name: str) -> torch.Tensor:
        raw = self._read(name)
        if raw.size % (3 * 96 * 96):
            raise RuntimeError(f"STL10 file {name} has {raw.size} bytes, not a multiple of 3×96×96: truncated?")
        # stored column-major per channel: (N, 3, 96, 96) with rows and columns swapped
        return torch.from_numpy(raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2).copy())

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split == "extra_unlabeled":
            images = self._images("unlabeled_X.bin")
            return images, torch.full((len(images),), -1, dtype=torch.int64)
        images = self._images(f"{split}_X.bin")
        labels = torch.from_numpy(self._read(f"{split}_y.bin").astype(np.int64) - 1)
        if len(labels) != len(images):
            raise RuntimeError(f"STL10 {split}: {len(images)} images but {len(labels)} labels")
        if split == "train" and self.fold is not None:
            folds = require_path(self.root / self.folder / "fold_indices.txt", "STL10", _STL_LAYOUT, "see above")
            index = torch.tensor([int(i) for i in folds.read_text().splitlines()[self.fold].split()])
            images, labels = images[index], labels[index]
        return images, labels
