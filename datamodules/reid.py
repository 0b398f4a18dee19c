"""Person re-identification data: Market-1501 / DukeMTMC-reID / MSMT17 folders, CamStyle fakes, cross-domain loaders.

On-disk format (Market-1501, Zheng et al. 2015; DukeMTMC-reID and ECN's MSMT17 re-layout use the same folders):

    <root>/bounding_box_train/             training images        0002_c1s1_000451_03.jpg
    <root>/bounding_box_test/              gallery                (Duke: 0005_c2_f0046985.jpg)
    <root>/query/                          queries
    <root>/bounding_box_train_camstyle/    CamStyle fakes         0002_c1s1_000451_03_fake_1to3.jpg

A name starts with the person id (digits, or ``-1``) and the 1-based camera, ``(-1|\\d+)_c(\\d+)``. Person ``-1``
marks junk boxes (dropped when loading, as every evaluation code does), person ``0000`` distractors (kept in the
gallery as negatives). Training ids are relabelled to ``0..N-1`` in sorted order; cameras become 0-based.

CamStyle (Zhong et al. CVPR 2018) adds, for every training image of camera ``c`` and every other camera ``d``, the
same image re-styled by a CycleGAN into camera ``d`` (``<stem>_fake_<c>to<d>.jpg``; for MSMT17, made with StarGAN,
``<stem>_fake_<d>.jpg``). ECN's target loader (``UnsupervisedCamStylePreprocessor``) draws a camera uniformly among
all ``C`` each time it serves an image and returns the original when it draws the image's own camera, else the fake;
the label is the image's *dataset index* (target identities are never used).

``CrossDomainReIDDataModule`` serves ``{"source": (images, labels), "target": (images, indices)}`` batches, both
streams of ``len(source) // (batch × world)`` steps per epoch (an epoch is one pass over the source, and the target
stream restarts as ECN's does), sharded across DDP ranks by ``ShardedRandomBatchSampler``; validation and test
serve the target's ``query`` then ``bounding_box_test`` as two loaders of ``(images, pids, cameras, indices)``,
split across ranks. ``SyntheticReIDDataModule`` writes and serves the embedded default
(``datamodules.generated.reid_toypeople``).

``zoo predict`` ranks a gallery for every query: the target's test split, or a ``predict_dir`` holding ``query/`` and
``gallery/`` (``PREDICT_LAYOUT``, read by ``read_predict_folder``), served the same way as query then gallery.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import Dataset
from torchvision.transforms import v2

from datamodules.base import (IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, DatasetNotFoundError, ZooDataModule,
                              list_images, read_image, require_path)

__all__ = [
    "ReIDRecords", "parse_reid_folder", "read_predict_folder", "PREDICT_LAYOUT", "camstyle_path", "ReIDImageDataset",
    "CamStyleTargetDataset", "RandomSizedRectCrop", "CrossDomainReIDDataModule", "SyntheticReIDDataModule",
]

#: ``<pid>_c<camera>``: the id is digits or ``-1`` (junk), nothing else (``12-3_c1...`` is no id, not ``int("12-3")``)
_NAME = re.compile(r"(-1|\d+)_c(\d+)")
_NAME_PATTERN = "'<pid>_c<camera>...' with <pid> digits or -1 and <camera> digits (e.g. 0002_c1s1_000451_03.jpg)"

MARKET_LAYOUT = """\
  <root>/bounding_box_train/<pid>_c<cam>...jpg         training images (Market: 0002_c1s1_000451_03.jpg, Duke: 0005_c2_f0046985.jpg)
  <root>/bounding_box_test/<pid>_c<cam>...jpg          gallery (pid -1: junk, dropped; 0000: distractors, kept)
  <root>/query/<pid>_c<cam>...jpg                      queries
  <root>/bounding_box_train_camstyle/<stem>_fake_<c>to<d>.jpg   CamStyle fakes of the training images (target domain)"""
PREDICT_LAYOUT = f"""\
  <predict_dir>/query/...     the query images (any names, any depth; endings {', '.join(IMAGE_EXTENSIONS)})
  <predict_dir>/gallery/...   the images every query is ranked against
  Names in Market style, <pid>_c<cam>... (0002_c1s1_000451_03.jpg), give the person id and camera: then a gallery
  image of the query's person from the query's camera is left out of its ranking (Market-1501 protocol) and junk
  (pid -1) is dropped. Other names are read without id or camera and nothing is left out."""
HOW_TO_GET = ("Market-1501: https://zheng-lab.cecs.anu.edu.au/Project/project_reid.html; DukeMTMC-reID: withdrawn by "
              "its creators, only the format is supported; CamStyle fakes: https://github.com/zhunzhong07/CamStyle")


class ReIDRecords(NamedTuple):
    """One folder's images: ``paths``, ``pids`` (raw ids, or ``0..N-1`` when relabelled) and 0-based ``cams``."""

    paths: list[Path]
    pids: torch.Tensor
    cams: torch.Tensor


def parse_reid_folder(folder: str | Path, relabel: bool = False) -> ReIDRecords:
    """Read a Market-format folder: every ``*.jpg`` sorted by name, junk (pid ``-1``) dropped.

    ``relabel`` maps the (sorted) person ids to ``0..N-1`` for a classifier; test folders keep raw ids so that query
    and gallery compare, and keep ``0`` (distractors). A name that does not start with ``<pid>_c<cam>`` is an error
    naming the file, not a silently skipped image.
    """
    folder = require_path(folder, f"re-ID folder '{Path(folder).name}'", MARKET_LAYOUT, HOW_TO_GET)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jpg")
    if not files:
        raise DatasetNotFoundError(f"no .jpg images in '{folder}'.\nExpected layout:\n{MARKET_LAYOUT}")
    paths, pids, cams = [], [], []
    for path in files:
        match = _NAME.match(path.name)
        if match is None:
            raise ValueError(f"'{path}': re-ID image names must match {_NAME_PATTERN}")
        pid, cam = int(match.group(1)), int(match.group(2))
        if pid == -1:
            continue
        if cam < 1:
            raise ValueError(f"'{path}': cameras are numbered from 1")
        paths.append(path)
        pids.append(pid)
        cams.append(cam - 1)
    pid_tensor = torch.tensor(pids, dtype=torch.int64)
    if relabel:
        pid_tensor = torch.unique(pid_tensor, return_inverse=True)[1]
    return ReIDRecords(paths, pid_tensor, torch.tensor(cams, dtype=torch.int64))


def read_predict_folder(folder: str | Path) -> ReIDRecords:
    """The images of a ``predict_dir`` subfolder (``query`` or ``gallery``) for ``zoo predict``, sorted by path.

    A Market-style name (``<pid>_c<cam>...``) gives its person id and 0-based camera, and junk (pid ``-1``) is dropped
    as the evaluation drops it; any other name gets pid and camera ``-1`` ("unknown"), which the rank-list writer
    never filters on (``zoo.reid.predict``).
    """
    paths, pids, cams = [], [], []
    for path in list_images(folder, what=f"predict_dir/{Path(folder).name}"):
        match = _NAME.match(path.name)
        pid, cam = (int(match.group(1)), int(match.group(2)) - 1) if match and int(match.group(2)) >= 1 else (-1, -1)
        if match and pid == -1:
            continue  # a Market junk box, left out as every evaluation code does
        paths.append(path)
        pids.append(pid)
        cams.append(cam)
    return ReIDRecords(paths, torch.tensor(pids, dtype=torch.int64), torch.tensor(cams, dtype=torch.int64))


def camstyle_path(camstyle_dir: Path, image: Path, own_camera: int, camera: int, naming: str = "pair") -> Path:
    """The CamStyle fake of ``image`` (0-based ``own_camera``) in 0-based ``camera``'s style.

    ``naming="pair"``: CycleGAN fakes of Market/Duke, ``<stem>_fake_<own+1>to<camera+1>.jpg``;
    ``naming="target"``: StarGAN fakes of MSMT17, ``<stem>_fake_<camera+1>.jpg``.
    """
    if naming == "pair":
        return camstyle_dir / f"{image.stem}_fake_{own_camera + 1}to{camera + 1}.jpg"
    if naming == "target":
        return camstyle_dir / f"{image.stem}_fake_{camera + 1}.jpg"
    raise ValueError(f"camstyle naming must be 'pair' or 'target', got {naming!r}")


class ReIDImageDataset(Dataset):
    """``(image, pid, camera, index)`` for every record; ``pid`` is the training label when the records are relabelled."""

    def __init__(self, records: ReIDRecords, transform: Optional[Callable] = None) -> None:
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        image = read_image(self.records.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.records.pids[index]), int(self.records.cams[index]), index


class CamStyleTargetDataset(Dataset):
    """The unlabeled target set as ECN reads it: ``(image, index)``, the image in a uniformly drawn camera's style.

    Each call draws a camera uniformly among ``num_cameras`` (torch's RNG, seeded per DataLoader worker): the
    image's own camera serves the original, any other serves the CamStyle fake (§3.3, camera invariance). With
    ``camstyle=False`` it always serves the original (exemplar invariance only). Every fake the draw can ask for is
    checked when the dataset is built, so a missing file is reported at once and not hours into training.
    """

    def __init__(
        self,
        records: ReIDRecords,
        camstyle_dir: Optional[Path],
        num_cameras: int,
        transform: Optional[Callable] = None,
        naming: str = "pair",
    ) -> None:
        self.records, self.camstyle_dir, self.num_cameras = records, camstyle_dir, num_cameras
        self.transform, self.naming = transform, naming
        if int(records.cams.max()) >= num_cameras:
            raise ValueError(f"an image has camera {int(records.cams.max()) + 1} but num_cameras is {num_cameras}")
        if camstyle_dir is not None:
            present = set(os.listdir(camstyle_dir))
            missing = [
                camstyle_path(camstyle_dir, path, int(cam), other, naming)
                for path, cam in zip(records.paths, records.cams.tolist())
                for other in range(num_cameras)
                if other != cam and camstyle_path(camstyle_dir, path, int(cam), other, naming).name not in present
            ]
            if missing:
                raise DatasetNotFoundError(
                    f"{len(missing)} CamStyle images are missing from '{camstyle_dir}', e.g. '{missing[0].name}' "
                    f"(one fake per training image and other camera, {naming!r} naming). Set camstyle: false to "
                    "train without camera invariance."
                )

    def __len__(self) -> int:
        return len(self.records.paths)

    def sample_path(self, index: int, generator: Optional[torch.Generator] = None) -> Path:
        """The file served for ``index`` this time: the original or one of its fakes, the camera drawn uniformly."""
        path, own = self.records.paths[index], int(self.records.cams[index])
        if self.camstyle_dir is None:
            return path
        camera = int(torch.randint(self.num_cameras, (), generator=generator))
        return path if camera == own else camstyle_path(self.camstyle_dir, path, own, camera, self.naming)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = read_image(self.sample_path(index))
        if self.transform is not None:
            image = self.transform(image)
        return image, index


class RandomSizedRectCrop(torch.nn.Module):
    """Crop a random region of 64-100 % of the area with height/width 2-3, resized to ``size`` (open-reid / ECN).

    Unlike ``RandomResizedCrop`` its fallback after 10 failed draws squashes the *whole* image to ``size`` rather
    than centre-cropping it: the square 256×256 CamStyle fakes always fall back and so keep the whole person.
    """

    def __init__(self, size: Sequence[int], area: tuple[float, float] = (0.64, 1.0),
                 aspect: tuple[float, float] = (2.0, 3.0), interpolation=v2.InterpolationMode.BILINEAR) -> None:
        super().__init__()
        self.size, self.area, self.aspect, self.interpolation = list(size), area, aspect, interpolation

    def forward(self, image):
        width, height = v2.functional.get_size(image)[::-1]
        for _ in range(10):
            target_area = float(torch.empty(()).uniform_(*self.area)) * width * height
            aspect = float(torch.empty(()).uniform_(*self.aspect))
            h, w = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
            if h <= height and w <= width:
                top = int(torch.randint(height - h + 1, ()))
                left = int(torch.randint(width - w + 1, ()))
                return v2.functional.resized_crop(image, top, left, h, w, self.size, self.interpolation, antialias=True)
        return v2.functional.resize(image, self.size, self.interpolation, antialias=True)


class CrossDomainReIDDataModule(ZooDataModule):
    """A labeled source domain and an unlabeled target domain in Market-1501 layout (ECN, UDA re-ID).

    Args:
        source_root: the labeled domain (its ``bounding_box_train`` is used).
        target_root: the unlabeled domain: ``bounding_box_train`` (+ ``bounding_box_train_camstyle``) for training,
            ``query`` and ``bounding_box_test`` for validation and test.
        image_size: ``(height, width)``; 256×128 as in ECN.
        batch_size: source images per step and rank (ECN: 128).
        target_batch_size: target images per step and rank (default: ``batch_size``).
        camstyle: serve CamStyle fakes in the target stream (camera invariance); needs the camstyle folder.
        camstyle_naming: ``"pair"`` (Market/Duke CycleGAN fakes) or ``"target"`` (MSMT17 StarGAN fakes).
        num_target_cameras: cameras of the target domain (default: read from its training names).
        random_erasing: probability of Random Erasing (ECN: 0.5), filled with ImageNet's mean values as ECN does.
        rect_crop: ECN's ``RandomSizedRectCrop`` (else a plain resize) before the flip.
        seed: fixes both training streams together with the epoch.
        predict_dir: ``zoo predict`` on one's own images: a folder with ``query/`` and ``gallery/``
            (``PREDICT_LAYOUT``); ``None`` ranks the target's test split.
    """

    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(
        self,
        *,
        source_root: str = "data/duke",
        target_root: str = "data/market",
        image_size: Sequence[int] = (256, 128),
        batch_size: int = 128,
        target_batch_size: Optional[int] = None,
        eval_batch_size: Optional[int] = 256,
        camstyle: bool = True,
        camstyle_naming: str = "pair",
        num_target_cameras: Optional[int] = None,
        random_erasing: float = 0.5,
        rect_crop: bool = True,
        seed: int = 0,
        num_workers: int = 4,
        pin_memory: bool = True,
        predict_dir: Optional[str] = None,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, predict_dir=predict_dir)
        if camstyle_naming not in ("pair", "target"):
            raise ValueError(f"camstyle_naming must be 'pair' or 'target', got {camstyle_naming!r}")
        self.source_root, self.target_root = Path(source_root), Path(target_root)
        self.image_size = tuple(image_size)
        self.target_batch_size = target_batch_size or batch_size
        self.camstyle, self.camstyle_naming, self.num_target_cameras = camstyle, camstyle_naming, num_target_cameras
        self.random_erasing, self.rect_crop, self.seed = random_erasing, rect_crop, seed
        self.source_set: Optional[ReIDImageDataset] = None
        self.target_set: Optional[CamStyleTargetDataset] = None
        self.query_set: Optional[ReIDImageDataset] = None
        self.gallery_set: Optional[ReIDImageDataset] = None
        self.num_classes: Optional[int] = None

    def train_transform(self) -> Callable:
        resize = (RandomSizedRectCrop(self.image_size) if self.rect_crop
                  else v2.Resize(self.image_size, antialias=True))
        steps = [resize, v2.RandomHorizontalFlip(), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                 v2.Normalize(self.mean, self.std)]
        if self.random_erasing > 0:
            # ECN erases after normalisation with the (unnormalised) CIFAR/ImageNet-like mean values, kept as is.
            steps.append(v2.RandomErasing(self.random_erasing, scale=(0.02, 0.4), ratio=(0.3, 1 / 0.3),
                                          value=[0.4914, 0.4822, 0.4465]))
        return v2.Compose(steps)

    def eval_transform(self) -> Callable:
        return v2.Compose([v2.Resize(self.image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                           v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])

    def predict_transform(self) -> Callable:
        return self.eval_transform()

    def setup(self, stage: Optional[str] = None) -> None:
        if stage == "predict" and self.predict_dir is not None:
            return  # predict_sets reads the folder; the target domain need not exist
        if self.query_set is None:
            self.query_set = ReIDImageDataset(parse_reid_folder(self.target_root / "query"), self.eval_transform())
            self.gallery_set = ReIDImageDataset(parse_reid_folder(self.target_root / "bounding_box_test"),
                                                self.eval_transform())
        if stage in (None, "fit") and self.source_set is None:
            source = parse_reid_folder(self.source_root / "bounding_box_train", relabel=True)
            self.source_set = ReIDImageDataset(source, self.train_transform())
            self.num_classes = int(source.pids.max()) + 1
            target = parse_reid_folder(self.target_root / "bounding_box_train")
            num_cameras = self.num_target_cameras or int(target.cams.max()) + 1
            camstyle_dir = None
            if self.camstyle:
                camstyle_dir = require_path(self.target_root / "bounding_box_train_camstyle", "CamStyle folder",
                                            MARKET_LAYOUT, HOW_TO_GET + " (or set camstyle: false)")
            self.target_set = CamStyleTargetDataset(target, camstyle_dir, num_cameras, self.train_transform(),
                                                    self.camstyle_naming)

    @property
    def num_target_images(self) -> int:
        """Slots of ECN's exemplar memory: one per target training image (reads the folder if not set up)."""
        if self.target_set is None:
            return len(parse_reid_folder(self.target_root / "bounding_box_train").paths)
        return len(self.target_set)

    def train_dataloader(self) -> CombinedLoader:
        if self.source_set is None or self.target_set is None:
            raise RuntimeError(f"{type(self).__name__}: call setup('fit') before train_dataloader()")
        _, world = self._world()
        num_batches = len(self.source_set) // (self.batch_size * world)
        if num_batches == 0:
            raise ValueError(f"{len(self.source_set)} source images cannot fill one step of {self.batch_size} × "
                             f"{world} ranks: lower batch_size")
        return self.two_stream_loader({"source": (self.source_set, self.batch_size),
                                       "target": (self.target_set, self.target_batch_size)}, num_batches, self.seed)

    def evaluation_sets(self, split: str) -> list[Dataset]:
        """Validation, test and predict: the target's ``query`` (loader 0), then ``bounding_box_test`` (loader 1)."""
        return [self.query_set, self.gallery_set]

    def predict_sets(self) -> list[Dataset]:
        """``zoo predict``: ``[query, gallery]`` of ``predict_dir`` (``PREDICT_LAYOUT``: it must hold ``query/`` and
        ``gallery/``), or of the target's test split when ``predict_dir`` is unset."""
        if self.predict_dir is None:
            return self.evaluation_sets("predict")
        folder = Path(self.predict_dir).expanduser()
        missing = [name for name in ("query", "gallery") if not (folder / name).is_dir()]
        if missing:
            raise DatasetNotFoundError(f"predict_dir '{folder.resolve()}' has no {' and no '.join(missing)} folder: "
                                       f"re-ID predicts by ranking a gallery for each query. Expected layout:\n"
                                       f"{PREDICT_LAYOUT}")
        return [ReIDImageDataset(read_predict_folder(folder / name), self.predict_transform())
                for name in ("query", "gallery")]


class SyntheticReIDDataModule(CrossDomainReIDDataModule):
    """The embedded default: ``datamodules.generated.reid_toypeople`` writes a source and a target domain in Market-1501
    layout
    (with CamStyle fakes) under ``root`` on first use, then they are read like the real sets.

    ``direction="source2target"`` adapts from the mild-camera domain to the strong-camera one (the default, the
    Duke→Market analogue); ``"target2source"`` swaps them.
    """

    def __init__(self, *, root: str = "data/synthetic_reid", generator_seed: int = 0,
                 direction: str = "source2target", image_size: Sequence[int] = (64, 32), batch_size: int = 64,
                 eval_batch_size: Optional[int] = 256, num_workers: int = 0, pin_memory: bool = False,
                 predict_dir: Optional[str] = None, **kwargs: Any) -> None:
        if direction not in ("source2target", "target2source"):
            raise ValueError(f"direction must be 'source2target' or 'target2source', got {direction!r}")
        source, target = (Path(root) / "source", Path(root) / "target")
        if direction == "target2source":
            source, target = target, source
        super().__init__(source_root=str(source), target_root=str(target), image_size=image_size,
                         batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, predict_dir=predict_dir, **kwargs)
        self.root, self.generator_seed = Path(root), generator_seed

    def prepare_data(self) -> None:
        from datamodules.generated.reid_toypeople import write_synthetic_reid

        trainer = getattr(self, "trainer", None)
        if self.predict_dir is not None and trainer is not None and trainer.predicting:
            return  # zoo predict on a predict_dir reads nothing of the embedded set
        write_synthetic_reid(self.root, seed=self.generator_seed)

    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare_data()  # a no-op once the set is installed (e.g. when prepare_data already ran on this node)
        super().setup(stage)
