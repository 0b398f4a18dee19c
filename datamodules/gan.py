"""Unpaired image-to-image translation data: two image folders per split, no correspondence between them.

On-disk format (CycleGAN, Zhu et al. 2017; U-GAT-IT, Kim et al. 2020 and NICE-GAN, Chen et al. 2020 use the same):

    <root>/trainA/*.{jpg,jpeg,png,bmp,webp}    domain A, training (any names; extensions in any case, mixed formats)
    <root>/trainB/...                          domain B, training
    <root>/testA/...                           domain A, test
    <root>/testB/...                           domain B, test
    <root>/labels.csv                          optional: ``split,file,label`` for evaluation (e.g. digit classes)

selfie2anime holds 3,400 / 3,400 training and 100 / 100 test images at 256²; horse2zebra, cat2dog and photo2vangogh
share the layout. Nothing pairs an A image with a B image: the two folders may even differ in size.

``UnpairedDataModule`` serves training batches ``{"A": (images, labels, indices), "B": (images, labels, indices)}``
through a ``CombinedLoader``: A and B each have their own ``ShardedRandomBatchSampler`` with its own seed, so the two
domains are shuffled independently, and both yield ``steps_per_epoch`` batches, so they stay in lock-step (the
smaller folder simply starts another pass). Validation, test and predict serve ``[testA, testB]`` as two loaders,
each rank taking items ``rank, rank + world, ...``; every item carries its dataset index so a model can gather the
outputs of all ranks and put them back in order. Labels are ``-1`` unless ``labels_file`` gives them; they exist for
evaluation (e.g. is a translated digit still the same digit) and a translation model must not train on them.

Preprocessing follows U-GAT-IT / CycleGAN's ``resize_and_crop``: training resizes to ``load_size²`` (286 for 256²
crops), takes a random ``image_size²`` crop and flips horizontally; evaluation resizes to ``image_size²``; images are
scaled to [−1, 1] (mean = std = 0.5, the tanh range of the generators). ``load_size=None`` serves the images as
they are (CycleGAN's ``--preprocess crop``): training only crops, evaluation serves the native size, and all images
must then share one size, which ``setup`` checks from the file headers.

``zoo predict`` translates ``testA`` to B and ``testB`` to A, or the images of a ``predict_dir`` (any names, any
depth) in one direction, ``predict_direction`` (``"a2b"``, the default, or ``"b2a"``), resized to the model's
``image_size²`` whatever ``load_size`` is.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from lightning.pytorch.utilities import CombinedLoader
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from datamodules.base import CorruptImageError, ImageFileDataset, ZooDataModule, read_image, require_path
from datamodules.base import IMAGE_EXTENSIONS
from datamodules.base import list_images as list_image_files
from datamodules.generated.gan_digit_domains import write_digit_domains

__all__ = [
    "IMAGE_EXTENSIONS", "UNPAIRED_LAYOUT", "SPLITS", "DIRECTIONS", "list_images", "read_labels_file",
    "UnpairedImageDataset", "DirectedImageFiles", "UnpairedDataModule", "DigitDomainsDataModule",
]

SPLITS = ("trainA", "trainB", "testA", "testB")
#: translation directions: ``"a2b"`` reads domain-A images and writes domain B
DIRECTIONS = ("a2b", "b2a")

UNPAIRED_LAYOUT = """\
  <root>/trainA/*.{jpg,jpeg,png,bmp,webp}   domain A, training images (any names)
  <root>/trainB/*.{jpg,jpeg,png,bmp,webp}   domain B, training images
  <root>/testA/*.{jpg,jpeg,png,bmp,webp}    domain A, test images
  <root>/testB/*.{jpg,jpeg,png,bmp,webp}    domain B, test images
  <root>/labels.csv                         optional, header 'split,file,label' (evaluation only)"""
HOW_TO_GET = ("selfie2anime: the Google Drive link in the U-GAT-IT README (https://github.com/taki0112/UGATIT); "
              "horse2zebra, photo2vangogh, ...: `bash datasets/download_cyclegan_dataset.sh horse2zebra` in "
              "https://github.com/junyanz/pytorch-CycleGAN-and-pix2pix; cat2dog: the DRIT repository "
              "(https://github.com/HsinYingLee/DRIT); any two image folders in this layout work")


def list_images(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` (by extension, any case), sorted by name.

    Raises:
        DatasetNotFoundError: the folder does not exist (the message gives the layout and where to get the data).
        ValueError: the folder holds no image file (the message names the folder).
    """
    folder = require_path(folder, f"unpaired image folder '{Path(folder).name}'", UNPAIRED_LAYOUT, HOW_TO_GET)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in '{folder.resolve()}'.\n"
                         f"Expected layout:\n{UNPAIRED_LAYOUT}")
    return files


def read_labels_file(path: str | Path) -> dict[tuple[str, str], int]:
    """``{(split, file name): label}`` from a CSV with header ``split,file,label`` (split is trainA/trainB/testA/testB).

    Rows for files that are not in the folders are allowed (a CSV may cover more than the copy on disk); files in the
    folders without a row are an error when the datasets are built.
    """
    path = require_path(path, "labels file", UNPAIRED_LAYOUT, "write it next to the folders (split,file,label rows)")
    labels: dict[tuple[str, str], int] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"split", "file", "label"} <= set(reader.fieldnames):
            raise ValueError(f"'{path}': the header must be 'split,file,label', got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            if row["split"] not in SPLITS:
                raise ValueError(f"'{path}' line {line}: split must be one of {', '.join(SPLITS)}, "
                                 f"got {row['split']!r}")
            try:
                labels[row["split"], row["file"]] = int(row["label"])
            except (TypeError, ValueError) as err:
                raise ValueError(f"'{path}' line {line}: label must be an integer, got {row['label']!r}") from err
    return labels


class UnpairedImageDataset(Dataset):
    """``(image, label, index)`` per file: ``label`` is ``-1`` without labels, ``index`` the position in ``files``."""

    def __init__(self, files: Sequence[Path], transform: Optional[Callable] = None,
                 labels: Optional[Sequence[int]] = None) -> None:
        if labels is not None and len(labels) != len(files):
            raise ValueError(f"got {len(labels)} labels for {len(files)} files")
        self.files, self.transform = list(files), transform
        self.labels = None if labels is None else [int(label) for label in labels]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = read_image(self.files[index], "RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, -1 if self.labels is None else self.labels[index], index


class DirectedImageFiles(ImageFileDataset):
    """A ``predict_dir`` for translation: ``ImageFileDataset`` items (``image``, ``path``, ``index``, ``size``) plus
    ``direction``, the translation to apply (``"a2b"`` or ``"b2a"``), so that ``predict_step`` needs no other input."""

    def __init__(self, files: list[Path], transform: Callable, direction: str, mode: str = "RGB") -> None:
        super().__init__(files, transform, mode)
        self.direction = direction

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**super().__getitem__(index), "direction": self.direction}


def _image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the file header only: PIL decodes no pixel until ``load``."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(f"cannot decode image '{path}': {err}") from err


class UnpairedDataModule(ZooDataModule):
    """Two unpaired image domains in CycleGAN / U-GAT-IT layout (see the module docstring).

    Args:
        root: the folder holding ``trainA``, ``trainB``, ``testA``, ``testB``.
        image_size: side of the training crops and of the evaluation images (U-GAT-IT: 256).
        load_size: side images are resized to before the random crop (U-GAT-IT: ``image_size + 30``); ``None``: no
            resize anywhere, all images must then share one size of at least ``image_size``.
        flip: random horizontal flips in training.
        batch_size: images per domain, step and rank (U-GAT-IT, CycleGAN: 1).
        eval_batch_size: batch size of the evaluation loaders (default: ``batch_size``).
        steps_per_epoch: batches per epoch and rank for both domains (default: one pass over the larger training
            folder, ``max(len(trainA), len(trainB)) // (batch_size × world size)``, at least 1).
        seed: with the epoch, fixes both training streams (A uses ``2·seed``, B ``2·seed + 1``).
        labels_file: CSV ``split,file,label`` (relative to ``root`` or absolute) whose labels the datasets return,
            for evaluation only; every image of a loaded folder needs a row.
        num_workers, pin_memory: dataloader settings.
        predict_dir: ``zoo predict`` on one's own images (a folder, any depth), translated in ``predict_direction``;
            ``None`` translates both test folders.
        predict_direction: ``"a2b"`` (the ``predict_dir`` images are domain A) or ``"b2a"``.
    """

    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def __init__(
        self,
        *,
        root: str,
        image_size: int = 256,
        load_size: Optional[int] = 286,
        flip: bool = True,
        batch_size: int = 1,
        eval_batch_size: Optional[int] = None,
        steps_per_epoch: Optional[int] = None,
        seed: int = 0,
        num_workers: int = 4,
        pin_memory: bool = True,
        labels_file: Optional[str] = None,
        predict_dir: Optional[str] = None,
        predict_direction: str = "a2b",
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, predict_dir=predict_dir)
        if predict_direction not in DIRECTIONS:
            raise ValueError(f"predict_direction must be 'a2b' or 'b2a', got {predict_direction!r}")
        self.predict_direction = predict_direction
        if image_size < 1:
            raise ValueError(f"image_size must be ≥ 1, got {image_size}")
        if load_size is not None and image_size > load_size:
            raise ValueError(f"image_size ({image_size}) cannot exceed load_size ({load_size}): the random crop is "
                             "taken from the image resized to load_size")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be ≥ 1, got {steps_per_epoch}")
        self.root, self.image_size, self.load_size, self.flip = Path(root), image_size, load_size, flip
        self.steps_per_epoch, self.seed, self.labels_file = steps_per_epoch, seed, labels_file
        self.train_a: Optional[UnpairedImageDataset] = None
        self.train_b: Optional[UnpairedImageDataset] = None
        self.test_a: Optional[UnpairedImageDataset] = None
        self.test_b: Optional[UnpairedImageDataset] = None

    # -- transforms ----------------------------------------------------------------------------------------------

    def _to_tensor(self) -> list[Callable]:
        return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def train_transform(self) -> Callable:
        # Bicubic as CycleGAN's get_transform (U-GAT-IT uses torchvision's bilinear default); PIL clamps the overshoot.
        steps: list[Callable] = []
        if self.load_size is not None:
            steps.append(v2.Resize((self.load_size, self.load_size), interpolation=v2.InterpolationMode.BICUBIC,
                                   antialias=True))
        steps.append(v2.RandomCrop(self.image_size))
        if self.flip:
            steps.append(v2.RandomHorizontalFlip())
        return v2.Compose(steps + self._to_tensor())

    def eval_transform(self) -> Callable:
        steps: list[Callable] = []
        if self.load_size is not None:
            steps.append(v2.Resize((self.image_size, self.image_size), interpolation=v2.InterpolationMode.BICUBIC,
                                   antialias=True))
        return v2.Compose(steps + self._to_tensor())

    def predict_transform(self) -> Callable:
        """A ``predict_dir`` image at the model's resolution, ``image_size²`` (bicubic), in [−1, 1]: unlike the test
        folders, one's own images need not share a size, even with ``load_size=None``."""
        return v2.Compose([v2.Resize((self.image_size, self.image_size), interpolation=v2.InterpolationMode.BICUBIC,
                                     antialias=True), *self._to_tensor()])

    # -- datasets ------------------------------------------------------------------------------------------------

    def _check_one_size(self, folders: dict[str, list[Path]]) -> None:
        """Without ``load_size`` nothing resizes, so a batch (and the crop) needs every image at one size."""
        reference: Optional[tuple[Path, tuple[int, int]]] = None
        for split, files in folders.items():
            for path in files:
                size = _image_size(path)
                if reference is None:
                    reference = (path, size)
                    if min(size) < self.image_size:
                        raise ValueError(f"load_size=None crops {self.image_size}² from the images as they are, but "
                                         f"'{path}' is only {size[0]}×{size[1]}: lower image_size or set load_size")
                elif size != reference[1]:
                    raise ValueError(
                        f"load_size=None needs all images at one size, but in folder '{self.root / split}' the file "
                        f"'{path.name}' is {size[0]}×{size[1]} while '{reference[0]}' is "
                        f"{reference[1][0]}×{reference[1][1]}: set load_size to resize them")

    def _build(self, splits: Sequence[str]) -> dict[str, UnpairedImageDataset]:
        require_path(self.root, "unpaired image-translation dataset", UNPAIRED_LAYOUT, HOW_TO_GET)
        folders = {split: list_images(self.root / split) for split in splits}
        if self.load_size is None:
            self._check_one_size(folders)
        table = None
        if self.labels_file is not None:
            labels_path = Path(self.labels_file).expanduser()
            table = read_labels_file(labels_path if labels_path.is_absolute() else self.root / labels_path)
        datasets = {}
        for split, files in folders.items():
            labels = None
            if table is not None:
                missing = [path for path in files if (split, path.name) not in table]
                if missing:
                    raise ValueError(f"'{missing[0]}' has no row in the labels file '{self.labels_file}' "
                                     f"({len(missing)} of {len(files)} files of {split} lack one)")
                labels = [table[split, path.name] for path in files]
            transform = self.train_transform() if split.startswith("train") else self.eval_transform()
            datasets[split] = UnpairedImageDataset(files, transform, labels)
        return datasets

    def setup(self, stage: Optional[str] = None) -> None:
        if stage == "predict" and self.predict_dir is not None:
            return  # predict_sets reads the folder; the dataset need not exist
        wanted = []
        if stage in (None, "fit") and self.train_a is None:
            wanted += ["trainA", "trainB"]
        if self.test_a is None:  # fit validates on the test folders; test / validate / predict read them
            wanted += ["testA", "testB"]
        if not wanted:
            return
        built = self._build(wanted)
        self.train_a, self.train_b = built.get("trainA", self.train_a), built.get("trainB", self.train_b)
        self.test_a, self.test_b = built.get("testA", self.test_a), built.get("testB", self.test_b)
        # the base class's names, for code that only looks at them
        self.train_set, self.val_set, self.test_set = self.train_a, self.test_a, self.test_a

    @property
    def test_sets(self) -> dict[str, UnpairedImageDataset]:
        """``{"A": testA, "B": testB}`` once set up (empty before), e.g. for a sample grid."""
        if self.test_a is None or self.test_b is None:
            return {}
        return {"A": self.test_a, "B": self.test_b}

    def judge_training_sets(self) -> tuple[UnpairedImageDataset, UnpairedImageDataset, int]:
        """``(trainA, trainB, num_classes)`` served with the *evaluation* transform, for training an evaluation
        network (``zoo.gan.evaluation.TranslationMetrics``); ``num_classes`` is 0 without a labels file."""
        built = self._build(["trainA", "trainB"])
        transform = self.eval_transform()
        for dataset in built.values():
            dataset.transform = transform
        labels = [label for d in built.values() for label in (d.labels or [])]
        return built["trainA"], built["trainB"], (max(labels) + 1 if labels else 0)

    # -- loaders -------------------------------------------------------------------------------------------------

    def num_train_steps(self) -> int:
        """Batches per epoch and rank of both training streams."""
        if self.train_a is None or self.train_b is None:
            raise RuntimeError(f"{type(self).__name__}: call setup('fit') first")
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        _, world = self._world()
        return max(1, max(len(self.train_a), len(self.train_b)) // (self.batch_size * world))

    def train_dataloader(self) -> CombinedLoader:
        if self.train_a is None or self.train_b is None:
            raise RuntimeError(f"{type(self).__name__}: call setup('fit') before train_dataloader()")
        # Two streams with their own seeds: A and B are shuffled independently, so no A/B pairing recurs.
        return self.two_stream_loader({"A": (self.train_a, self.batch_size), "B": (self.train_b, self.batch_size)},
                                      self.num_train_steps(), self.seed)

    def evaluation_sets(self, split: str) -> list[Dataset]:
        """Validation, test and predict: ``testA`` (loader 0), then ``testB`` (loader 1)."""
        return [self.test_a, self.test_b]

    def predict_sets(self) -> Dataset | list[Dataset]:
        """``zoo predict``: the images of ``predict_dir`` to translate in ``predict_direction``
        (``DirectedImageFiles``), or ``[testA, testB]`` (translated to B and to A) when it is unset."""
        if self.predict_dir is None:
            return self.evaluation_sets("predict")
        return DirectedImageFiles(list_image_files(self.predict_dir), self.predict_transform(), self.predict_direction,
                                  self.predict_image_mode)


class DigitDomainsDataModule(UnpairedDataModule):
    """The embedded default: "pen on paper" (A) ↔ "bold neon on dark" (B) digits, written to ``root`` on first use.

    The set is written (a few seconds, deterministic from ``seed``) by ``prepare_data``, or by ``setup`` when it is
    called without a Trainer, and read back by ``UnpairedDataModule`` with ``labels.csv`` as its labels file.

    Args:
        root: where the set is written.
        image_size: side of the written PNGs and of the training crops and evaluation images.
        load_size: training resize before the random crop (36 for 32² crops, U-GAT-IT's ``+30`` scaled down).
        flip: off by default, a mirrored digit is not a digit.
        seed: the generator's seed, also the samplers' seed unless ``sampler_seed`` is given.
        sampler_seed: seed of the training streams (default: ``seed``).
        batch_size, eval_batch_size, steps_per_epoch, num_workers, pin_memory, predict_dir, predict_direction: see
            ``UnpairedDataModule``.
    """

    def __init__(
        self,
        *,
        root: str = "data/digit_domains",
        image_size: int = 32,
        load_size: Optional[int] = 36,
        flip: bool = False,
        batch_size: int = 1,
        eval_batch_size: Optional[int] = None,
        steps_per_epoch: Optional[int] = None,
        seed: int = 0,
        sampler_seed: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        predict_dir: Optional[str] = None,
        predict_direction: str = "a2b",
    ) -> None:
        super().__init__(root=root, image_size=image_size, load_size=load_size, flip=flip, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, steps_per_epoch=steps_per_epoch,
                         seed=seed if sampler_seed is None else sampler_seed, num_workers=num_workers,
                         pin_memory=pin_memory, labels_file="labels.csv", predict_dir=predict_dir,
                         predict_direction=predict_direction)
        self.generator_seed = seed

    def prepare_data(self) -> None:
        if self._predicting_own_images():
            return  # zoo predict on a predict_dir reads nothing of the embedded set
        write_digit_domains(self.root, image_size=self.image_size, seed=self.generator_seed)

    def _predicting_own_images(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return self.predict_dir is not None and trainer is not None and trainer.predicting

    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare_data()  # a no-op once the set is installed (e.g. when prepare_data already ran on this node)
        super().setup(stage)
