"""The few-shot DataModules: episodic loaders over base (train), validation and novel (test) classes.

``FewShotDataModule`` builds the episodic loaders of ``datamodules.fewshot.episodes`` over a split's images; its
subclasses read the on-disk formats:

- ``OmniglotDataModule``: ``images_background/`` and ``images_evaluation/`` of brendenlake/omniglot (one folder per
  alphabet, one per character, 20 PNGs each); rotations by multiples of 90° are new classes (Vinyals et al. 2016).
  Split: background alphabets are base classes except the last ``val_alphabets`` (validation), evaluation alphabets
  are novel; or the Vinyals split files ``train.txt``/``val.txt``/``test.txt`` (``Alphabet/characterNN/rotDDD``).
- ``CloserLookDataModule``: ``base.json``, ``val.json``, ``novel.json`` as written by CloserLook's
  ``write_*_filelist.py`` (``label_names``, ``image_names``, ``image_labels``), for miniImageNet and CUB.
- ``GlyphsDataModule``: writes a procedural glyph set (``datamodules.generated.fewshot_glyphs``) in Omniglot's layout
  once, then reads it through ``OmniglotDataModule``.

``zoo predict`` runs on every test setting's fixed episodes, or, with ``predict_dir``, on one episode made of one's own
images (``FolderEpisode``: ``support/<class name>/*`` are the labelled shots, ``query/**`` the images to classify).

Baseline/Baseline++ pre-train on plain batches: ``train_mode="batch"`` swaps the training sampler for
``datamodules.sampler.ClassBalancedBatchSampler``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from datamodules.base import (IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, DatasetNotFoundError, ZooDataModule,
                              list_images, read_image, require_path)
from datamodules.fewshot.episodes import EpisodeCollate, EpisodeSetting, EpisodicBatchSampler
from datamodules.sampler import ClassBalancedBatchSampler

__all__ = [
    "FewShotImageDataset", "FolderEpisode", "PREDICT_LAYOUT", "FewShotDataModule", "OmniglotDataModule",
    "CloserLookDataModule", "GlyphsDataModule",
]


def _invert(image: torch.Tensor) -> torch.Tensor:
    return 1.0 - image


def _resize(image: torch.Tensor, image_size: int, channels: int) -> torch.Tensor:
    """The evaluation resize of a uint8 image ``(C, H, W)``."""
    if channels == 3:  # CloserLook's evaluation transform: resize to 1.15× then centre-crop
        image = v2.functional.resize(image, [int(image_size * 1.15)] * 2, antialias=True)
        return v2.functional.center_crop(image, [image_size] * 2)
    return v2.functional.resize(image, [image_size] * 2, antialias=True)


def _test_transform(image: Any, image_size: int, channels: int, finish: Callable[[torch.Tensor], torch.Tensor]
                    ) -> torch.Tensor:
    """A PIL image through the test split's steps: to uint8 tensor, resize, ``finish`` (float, invert, normalise)."""
    return finish(_resize(v2.functional.pil_to_tensor(image), image_size, channels))


class FewShotImageDataset(Dataset):
    """Images on disk with a class id each; an optional rotation (multiple of 90°) per item.

    ``cache=True`` decodes and resizes every file once (as uint8) and keeps it in memory: Omniglot-sized sets fit in
    a few MB and episodes then cost no disk reads. Rotations are exact (``torch.rot90``) and applied after the cache.
    """

    def __init__(
        self,
        files: Sequence[Path],
        file_index: torch.Tensor,
        labels: torch.Tensor,
        rotations: torch.Tensor,
        load: Callable[[Path], torch.Tensor],
        finish: Callable[[torch.Tensor], torch.Tensor],
        cache: Optional[torch.Tensor] = None,
    ) -> None:
        self.files, self.file_index, self.labels, self.rotations = list(files), file_index, labels, rotations
        self.load, self.finish, self.cache = load, finish, cache

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        f = int(self.file_index[i])
        image = self.cache[f] if self.cache is not None else self.load(self.files[f])
        k = int(self.rotations[i]) // 90
        if k:
            image = torch.rot90(image, k, dims=(-2, -1))
        return self.finish(image), int(self.labels[i])


PREDICT_LAYOUT = """\
  <predict_dir>/support/<class name>/*.png   the labelled examples: one folder per class (at least two), its images
                                             (any depth) are the shots; the folder name is the predicted label
  <predict_dir>/query/**/*.png               the images to classify (any depth)"""


class FolderEpisode(Dataset):
    """One few-shot episode made of one's own images, for ``zoo predict`` with ``data.init_args.predict_dir``.

    Every image under ``support/<class name>/`` is a shot of that class (classes in sorted folder order; they may have
    different numbers of shots), every image under ``query/`` (any depth) a query. The single item is a dict
    ``{"support": (S, C, H, W), "support_labels": (S,) episode class of each shot, "class_names": [N names],
    "query": (M, C, H, W), "paths": [M query files]}``, the images through the test split's transform.

    Args:
        folder: the ``predict_dir``.
        transform: PIL image → model input (``FewShotDataModule.predict_transform``).
        mode: the PIL mode the images are read in (``"L"`` or ``"RGB"``).

    Raises:
        DatasetNotFoundError: ``support/`` or ``query/`` is missing, fewer than two class folders, images directly
            under ``support/``, or a class folder or ``query/`` without images; the message shows ``PREDICT_LAYOUT``.
    """

    def __init__(self, folder: str | Path, transform: Callable[[Any], torch.Tensor], mode: str) -> None:
        folder = Path(folder).expanduser()
        self.transform, self.mode = transform, mode
        for part in ("support", "query"):
            if not (folder / part).is_dir():
                self._fail(f"'{(folder / part).resolve()}' is missing")
        support = folder / "support"
        loose = sorted(p.name for p in support.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if loose:
            self._fail(f"'{support.resolve()}' holds images outside a class folder ({', '.join(loose[:3])}); put "
                       "each class's images in support/<class name>/")
        class_dirs = sorted(p for p in support.iterdir() if p.is_dir() and not p.name.startswith("."))  # not .git/
        if len(class_dirs) < 2:
            self._fail(f"'{support.resolve()}' has {len(class_dirs)} class folder(s); an episode needs at least two")
        self.class_names = [d.name for d in class_dirs]
        self.support_files: list[Path] = []
        labels: list[int] = []
        for label, class_dir in enumerate(class_dirs):
            try:
                files = list_images(class_dir, what=f"predict_dir support class '{class_dir.name}'")
            except DatasetNotFoundError as err:
                self._fail(str(err))
            self.support_files += files
            labels += [label] * len(files)
        self.support_labels = torch.tensor(labels)
        try:
            self.query_files = list_images(folder / "query", what="predict_dir query/")
        except DatasetNotFoundError as err:
            self._fail(str(err))

    @staticmethod
    def _fail(problem: str) -> NoReturn:
        raise DatasetNotFoundError(f"few-shot predict_dir: {problem}. Expected the layout\n{PREDICT_LAYOUT}")

    def __len__(self) -> int:
        return 1

    def _images(self, files: list[Path]) -> torch.Tensor:
        return torch.stack([self.transform(read_image(f, self.mode)) for f in files])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index != 0:
            raise IndexError(index)
        return {"support": self._images(self.support_files), "support_labels": self.support_labels.clone(),
                "class_names": list(self.class_names), "query": self._images(self.query_files),
                "paths": [str(f) for f in self.query_files]}


def _the_item(items: list[Any]) -> Any:
    """Collate of a loader over one-item batches that are already whole episodes: the item itself."""
    return items[0]


@dataclass
class _Split:
    """A split as lists: per class its files and rotation; built by the format-specific subclasses."""

    class_names: list[str]
    class_files: list[list[Path]]
    class_rotations: list[int]


class FewShotDataModule(ZooDataModule):
    """Episodic loaders over base (train), val and novel (test) classes; subclasses read the on-disk formats.

    Args:
        image_size: square side the images are resized to (84 for Conv-4 on miniImageNet, 224 for ResNets,
            28 for Omniglot).
        channels: 1 (grey) or 3 (RGB).
        train_episodes: the training episode shape, ``episodes`` per epoch (CloserLook: 5-way, 16 queries, 100).
        val_episodes: the fixed validation episodes (model selection on ``val/acc``).
        test_episodes: one fixed test set per setting; each is its own test dataloader and its accuracy is logged
            as ``test/acc_<N>way<K>shot`` with ``test/ci95_<N>way<K>shot`` (600 episodes, 15 queries: CloserLook).
        train_mode: ``episodic``, or ``batch`` for plain class-balanced batches of ``batch_size`` over the base
            classes (Baseline/Baseline++ pre-training).
        augment: CloserLook's training augmentation (random resized crop, colour jitter, flip) for RGB data.
        cache: decode and resize all images once and keep them in memory (small datasets such as Omniglot).
        seed: seed of the episode samplers (independent of the training seed).
        batch_size: the plain-batch size of ``train_mode="batch"``.
        num_workers, pin_memory: see ``ZooDataModule``.
        predict_dir: a folder laid out as ``support/<class name>/*.png`` + ``query/**/*.png`` (``PREDICT_LAYOUT``):
            ``zoo predict`` classifies the queries given the support images as one episode (``FolderEpisode``);
            ``None``: predict on the test settings' fixed episodes.
    """

    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None

    def __init__(
        self,
        *,
        image_size: int = 84,
        channels: int = 3,
        train_episodes: EpisodeSetting = EpisodeSetting(5, 5, 16, 100),
        val_episodes: EpisodeSetting = EpisodeSetting(5, 5, 15, 100),
        test_episodes: Sequence[EpisodeSetting] = (EpisodeSetting(5, 1, 15, 600), EpisodeSetting(5, 5, 15, 600)),
        train_mode: str = "episodic",
        augment: bool = False,
        cache: bool = False,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        predict_dir: Optional[str] = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         predict_dir=predict_dir)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if train_mode not in ("episodic", "batch"):
            raise ValueError(f"train_mode must be 'episodic' or 'batch', got {train_mode!r}")
        self.image_size, self.channels = image_size, channels
        self.train_episodes, self.val_episodes = train_episodes, val_episodes
        self.test_episodes = list(test_episodes)
        names = [s.name for s in self.test_episodes]
        if len(set(names)) != len(names):
            raise ValueError(f"test_episodes repeat a setting: {names}")
        self.train_mode, self.augment, self.cache, self.seed = train_mode, augment, cache, seed
        if cache and augment:
            raise ValueError("cache=True stores resized images and cannot be combined with augment=True")
        self.splits: dict[str, _Split] = {}
        self.datasets: dict[str, FewShotImageDataset] = {}

    # ---- format-specific ----
    def read_splits(self) -> dict[str, _Split]:
        """Return ``{"train": ..., "val": ..., "test": ...}``; raise ``DatasetNotFoundError`` if anything is missing."""
        raise NotImplementedError

    #: grey images with dark strokes on white (Omniglot) are inverted so strokes are 1 and padding matches background
    invert: bool = False

    # ---- shared ----
    @property
    def num_classes(self) -> Optional[int]:
        """Number of base (training) classes, once known."""
        return len(self.splits["train"].class_names) if "train" in self.splits else None

    def _load_image(self, path: Path) -> torch.Tensor:
        image = read_image(path, "L" if self.channels == 1 else "RGB")
        return self.resize(v2.functional.pil_to_tensor(image))

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        return _resize(image, self.image_size, self.channels)

    def _finish(self) -> Callable[[torch.Tensor], torch.Tensor]:
        steps: list[Callable] = [v2.ToDtype(torch.float32, scale=True)]
        if self.invert:
            steps.append(_invert)
        if self.mean is not None:
            steps.append(v2.Normalize(self.mean, self.std))
        return v2.Compose(steps)

    def _train_load(self, path: Path) -> torch.Tensor:
        image = read_image(path, "L" if self.channels == 1 else "RGB")
        augment = v2.Compose([
            v2.RandomResizedCrop(self.image_size, antialias=True),
            v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
        ])
        return augment(image)

    def _build(self, split: _Split, train: bool, cache: Optional[torch.Tensor],
               files: list[Path], file_id: dict[Path, int]) -> FewShotImageDataset:
        file_index, labels, rotations = [], [], []
        for c, (paths, rotation) in enumerate(zip(split.class_files, split.class_rotations)):
            file_index += [file_id[p] for p in paths]
            labels += [c] * len(paths)
            rotations += [rotation] * len(paths)
        load = self._train_load if (train and self.augment) else self._load_image
        return FewShotImageDataset(files, torch.tensor(file_index), torch.tensor(labels), torch.tensor(rotations),
                                   load, self._finish(), cache)

    def _predicts_own_images(self, stage: Optional[str]) -> bool:
        """``zoo predict`` on a ``predict_dir``: the dataset's splits are not needed (nor written, for glyphs)."""
        trainer = getattr(self, "trainer", None)
        predicting = stage == "predict" or (stage is None and trainer is not None and trainer.predicting)
        return self.predict_dir is not None and predicting

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets or self._predicts_own_images(stage):
            return
        self.splits = self.read_splits()
        files = sorted({p for s in self.splits.values() for paths in s.class_files for p in paths})
        missing = [p for p in files if not p.is_file()]
        if missing:
            raise DatasetNotFoundError(f"{len(missing)} image(s) listed by the split are missing, e.g. '{missing[0]}'")
        file_id = {p: i for i, p in enumerate(files)}
        cache = None
        if self.cache:
            rank_zero_info(f"decoding {len(files)} images into memory ({self.image_size}×{self.image_size})")
            cache = torch.stack([self._load_image(p) for p in files])
        # labels are contiguous within each split (0..C-1 on base classes, for the pre-training classifier)
        for name, split in self.splits.items():
            self.datasets[name] = self._build(split, name == "train", cache, files, file_id)
        self.train_set, self.val_set = self.datasets["train"], self.datasets["val"]
        self.test_set = self.datasets["test"]

    def class_names(self, split: str) -> list[str]:
        return self.splits[split].class_names

    def _episodic_loader(self, dataset: FewShotImageDataset, setting: EpisodeSetting, fixed: bool,
                         seed: int) -> DataLoader:
        """Training episodes (resumable, new every epoch) or a fixed evaluation list, sharded over ranks."""
        rank, world = self._world()
        sampler = EpisodicBatchSampler(dataset.labels, setting.n_way, setting.k_shot, setting.n_query,
                                       setting.episodes, seed=seed, fixed=fixed, rank=rank, world_size=world)
        collate = EpisodeCollate(setting.n_way, setting.k_shot, setting.n_query)
        if not fixed:
            return self.batch_sampler_loader(dataset, sampler, collate_fn=collate)
        self._check_sampler_setting()
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_set, "training")
        if self.train_mode == "batch":
            rank, world = self._world()
            sampler = ClassBalancedBatchSampler(dataset.labels, self.batch_size, seed=self.seed, rank=rank,
                                                world_size=world)
            return self.batch_sampler_loader(dataset, sampler)
        return self._episodic_loader(dataset, self.train_episodes, fixed=False, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return self._episodic_loader(self.val_set, self.val_episodes, fixed=True, seed=self.seed + 1)

    def test_dataloader(self) -> list[DataLoader]:
        # the same seed for every setting: 5-way 1-shot episodes start from the same draws as 5-way 5-shot ones
        return [self._episodic_loader(self.test_set, s, fixed=True, seed=self.seed + 2) for s in self.test_episodes]

    # ---- zoo predict ----
    @property
    def predict_image_mode(self) -> str:  # type: ignore[override]
        return "L" if self.channels == 1 else "RGB"

    def predict_transform(self) -> Callable[[Any], torch.Tensor]:
        """The test split's transform of one PIL image: resize (and centre-crop for RGB), to float, invert (Omniglot
        and glyphs), normalise."""
        # a partial of module-level functions, so loader workers can pickle it
        return partial(_test_transform, image_size=self.image_size, channels=self.channels, finish=self._finish())

    def predict_sets(self) -> Dataset | list[Dataset]:
        """With ``predict_dir``: one ``FolderEpisode`` of its ``support/<class name>/`` and ``query/`` images (this
        family reads a structured folder, ``PREDICT_LAYOUT``, not a flat one); without: the test split."""
        if self.predict_dir is None:
            return self._require(self.test_set, "test")
        return FolderEpisode(self.predict_dir, self.predict_transform(), self.predict_image_mode)

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        """Every test setting's fixed episodes (one loader each, as ``zoo test``), or the ``predict_dir`` episode."""
        if self.predict_dir is None:
            return self.test_dataloader()
        return self.eval_loader(self.predict_sets(), collate_fn=_the_item)


_OMNIGLOT_LAYOUT = """\
  <root>/images_background/<Alphabet>/character<NN>/<CCCC>_<DD>.png   (30 alphabets, 964 characters)
  <root>/images_evaluation/<Alphabet>/character<NN>/<CCCC>_<DD>.png   (20 alphabets, 659 characters)
  optional <split_dir>/{train,val,test}.txt with lines 'Alphabet/characterNN/rotDDD' (Vinyals split)"""


class OmniglotDataModule(FewShotDataModule):
    """Omniglot (Lake et al. 2015) in its release layout, characters × rotations as classes.

    Args:
        root: folder holding ``images_background/`` and ``images_evaluation/``.
        rotations: rotations (degrees, multiples of 90) that make new classes (Vinyals et al.: 0, 90, 180, 270).
        val_alphabets: the last (sorted) background alphabets held out as validation classes.
        split_dir: folder with the Vinyals split files; overrides the background/evaluation split.
        image_size, channels, train_episodes, val_episodes, test_episodes, cache: 28×28 grey, cached in memory,
            5-way 5-shot training, 5-way 1-shot validation, 5-way 1- and 5-shot and 20-way 1-shot tests.
        **kwargs: see ``FewShotDataModule``.
    """

    invert = True

    def __init__(
        self,
        *,
        root: str = "data/omniglot",
        rotations: Sequence[int] = (0, 90, 180, 270),
        val_alphabets: int = 5,
        split_dir: Optional[str] = None,
        image_size: int = 28,
        channels: int = 1,
        train_episodes: EpisodeSetting = EpisodeSetting(5, 5, 15, 100),
        val_episodes: EpisodeSetting = EpisodeSetting(5, 1, 15, 200),
        test_episodes: Sequence[EpisodeSetting] = (EpisodeSetting(5, 1, 15, 600), EpisodeSetting(5, 5, 15, 600),
                                                   EpisodeSetting(20, 1, 15, 600)),
        cache: bool = True,
        predict_dir: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, channels=channels, train_episodes=train_episodes,
                         val_episodes=val_episodes, test_episodes=test_episodes, cache=cache,
                         predict_dir=predict_dir, **kwargs)
        if any(r % 90 for r in rotations) or not rotations:
            raise ValueError(f"rotations must be multiples of 90 degrees, got {list(rotations)}")
        self.root, self.rotations = Path(root), [int(r) % 360 for r in rotations]
        self.val_alphabets, self.split_dir = val_alphabets, split_dir

    def _characters(self, folder: str) -> list[Path]:
        """The character folders ``<folder>/<alphabet>/<characterNN>``; a folder without any is an error naming it
        (an empty ``images_background`` would otherwise surface as "0 alphabets found", naming nothing)."""
        how_to_get = "https://github.com/brendenlake/omniglot (python/images_*.zip), or GlyphsDataModule"
        base = require_path(self.root / folder, "Omniglot", _OMNIGLOT_LAYOUT, how_to_get)
        characters = sorted(c for a in sorted(base.iterdir()) if a.is_dir() for c in sorted(a.iterdir()) if c.is_dir())
        if not characters:
            raise DatasetNotFoundError(
                f"Omniglot folder '{base}' holds no character folders; expected "
                f"{folder}/<alphabet>/<characterNN>/<id>_<drawer>.png, i.e.\n{_OMNIGLOT_LAYOUT}\nHow to get it: "
                f"{how_to_get}"
            )
        return characters

    def _split_from(self, characters: list[Path], rotations: Sequence[int]) -> _Split:
        names, files, rots = [], [], []
        for char in characters:
            pngs = sorted(char.glob("*.png"))
            if not pngs:
                raise DatasetNotFoundError(f"Omniglot character folder '{char}' has no PNG files")
            for r in rotations:
                names.append(f"{char.parent.name}/{char.name}/rot{r:03d}")
                files.append(pngs)
                rots.append(r)
        return _Split(names, files, rots)

    def read_splits(self) -> dict[str, _Split]:
        background = self._characters("images_background")
        evaluation = self._characters("images_evaluation")
        if self.split_dir is not None:
            return self._vinyals_splits(background + evaluation)
        alphabets = sorted({c.parent.name for c in background})
        if not 0 < self.val_alphabets < len(alphabets):
            raise ValueError(f"val_alphabets={self.val_alphabets} must leave base alphabets ({len(alphabets)} found)")
        val_names = set(alphabets[-self.val_alphabets:])
        return {
            "train": self._split_from([c for c in background if c.parent.name not in val_names], self.rotations),
            "val": self._split_from([c for c in background if c.parent.name in val_names], self.rotations),
            "test": self._split_from(evaluation, self.rotations),
        }

    def _vinyals_splits(self, characters: list[Path]) -> dict[str, _Split]:
        by_name = {f"{c.parent.name}/{c.name}": c for c in characters}
        splits = {}
        for split, file in (("train", "train.txt"), ("val", "val.txt"), ("test", "test.txt")):
            path = require_path(Path(self.split_dir) / file, "Omniglot Vinyals split file", _OMNIGLOT_LAYOUT,
                                "jakesnell/prototypical-networks data/omniglot/splits/vinyals/")
            names, files, rots = [], [], []
            for line in path.read_text().split():
                char_name, rot = line.rsplit("/", 1)
                if char_name not in by_name:
                    raise DatasetNotFoundError(f"'{path}' lists '{char_name}', which is in neither images folder")
                names.append(line)
                files.append(sorted(by_name[char_name].glob("*.png")))
                rots.append(int(rot.removeprefix("rot")))
            splits[split] = _Split(names, files, rots)
        return splits


_CLOSERLOOK_LAYOUT = """\
  <root>/base.json, <root>/val.json, <root>/novel.json, each
    {"label_names": [...], "image_names": ["<path>.jpg", ...], "image_labels": [<int>, ...]}
  image paths absolute or relative to <root> (CloserLookFewShot filelists/<dataset>/write_*_filelist.py)"""


class CloserLookDataModule(FewShotDataModule):
    """The CloserLookFewShot split files (Chen et al. 2019) for miniImageNet, CUB or any image set.

    Args:
        root: folder holding ``base.json``, ``val.json`` and ``novel.json``.
        channels, augment, num_workers, pin_memory: 84×84 RGB with ImageNet normalisation and augmentation.
        **kwargs: see ``FewShotDataModule``.
    """

    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(
        self,
        *,
        root: str = "data/miniImagenet",
        channels: int = 3,
        augment: bool = True,
        num_workers: int = 4,
        pin_memory: bool = True,
        predict_dir: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(channels=channels, augment=augment, num_workers=num_workers, pin_memory=pin_memory,
                         predict_dir=predict_dir, **kwargs)
        self.root = Path(root)
        if channels == 1:
            self.mean, self.std = None, None

    def read_splits(self) -> dict[str, _Split]:
        splits = {}
        for split, file in (("train", "base.json"), ("val", "val.json"), ("test", "novel.json")):
            path = require_path(self.root / file, "CloserLook split file", _CLOSERLOOK_LAYOUT,
                                "CloserLookFewShot filelists/<dataset>/download_<dataset>.sh")
            try:
                meta = json.loads(path.read_text())
                names, labels, label_names = meta["image_names"], meta["image_labels"], meta["label_names"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"'{path}' is not a CloserLook split file ({err!r}); expected\n{_CLOSERLOOK_LAYOUT}")
            if len(names) != len(labels):
                raise ValueError(f"'{path}': {len(names)} image_names but {len(labels)} image_labels")
            not_int = [label for label in labels if not isinstance(label, int) or isinstance(label, bool)]
            if not_int:
                bad = not_int[0]
                raise ValueError(f"'{path}': image_labels must be integers indexing label_names, got {bad!r}; "
                                 f"expected\n{_CLOSERLOOK_LAYOUT}")
            # a label indexes label_names: past its end (or negative, which Python would index from the end) it
            # names no class, and the split would fail later without naming the file
            if labels and (min(labels) < 0 or max(labels) >= len(label_names)):
                bad = min(labels) if min(labels) < 0 else max(labels)
                raise ValueError(f"'{path}': image_labels holds the label {bad} but label_names has "
                                 f"{len(label_names)} entries (labels must lie in 0..{len(label_names) - 1}); "
                                 f"expected\n{_CLOSERLOOK_LAYOUT}")
            by_label: dict[int, list[Path]] = {}
            for name, label in zip(names, labels):
                by_label.setdefault(label, []).append(Path(name) if os.path.isabs(name) else self.root / name)
            ordered = sorted(by_label)
            splits[split] = _Split([str(label_names[c]) for c in ordered], [by_label[c] for c in ordered],
                                   [0] * len(ordered))
        return splits


class GlyphsDataModule(OmniglotDataModule):
    """The embedded default: a procedural glyph alphabet (``datamodules.generated.fewshot_glyphs``) in Omniglot's
    layout.

    The set is written to ``root`` on first use (deterministic from ``glyph_seed``; about 20 s) and read back by
    the Omniglot loader. Background alphabets minus ``val_alphabets`` are base classes, evaluation alphabets novel.

    Args:
        root: where the glyph set is written.
        background_alphabets, evaluation_alphabets, characters_per_alphabet, drawers, glyph_seed: the generator's
            parameters (see ``datamodules.generated.fewshot_glyphs.write_glyph_omniglot``).
        rotations, val_alphabets: see ``OmniglotDataModule`` (one rotation, the last 4 background alphabets).
        **kwargs: see ``OmniglotDataModule`` and ``FewShotDataModule``.
    """

    def __init__(
        self,
        *,
        root: str = "data/glyphs",
        background_alphabets: int = 24,
        evaluation_alphabets: int = 8,
        characters_per_alphabet: int = 15,
        drawers: int = 20,
        glyph_seed: int = 0,
        rotations: Sequence[int] = (0,),
        val_alphabets: int = 4,
        predict_dir: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, rotations=rotations, val_alphabets=val_alphabets, predict_dir=predict_dir,
                         **kwargs)
        self.glyph_args = dict(background_alphabets=background_alphabets, evaluation_alphabets=evaluation_alphabets,
                               characters_per_alphabet=characters_per_alphabet, drawers=drawers, seed=glyph_seed)

    @property
    def num_classes(self) -> int:
        a = self.glyph_args
        return (a["background_alphabets"] - self.val_alphabets) * a["characters_per_alphabet"] * len(self.rotations)

    def prepare_data(self) -> None:
        from datamodules.generated.fewshot_glyphs import write_glyph_omniglot

        if self._predicts_own_images(None):  # predicting one's own images needs no glyph set
            return
        write_glyph_omniglot(self.root, **self.glyph_args)

    def setup(self, stage: Optional[str] = None) -> None:
        if self._predicts_own_images(stage):
            return
        self.prepare_data()  # idempotent (cached by a marker file); covers use without a Trainer
        super().setup(stage)
