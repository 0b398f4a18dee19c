"""Weakly supervised semantic segmentation: PASCAL VOC 2012 with the SBD augmentation (``SegmentationClassAug``), as
users unpack it for SEAM / PPC (Du et al., CVPR 2022; official code usr922/wseg):

    <root>/JPEGImages/<id>.jpg                      the images (``<id>.png`` is taken too)
    <root>/SegmentationClassAug/<id>.png            indexed (palette) or grey PNG: 0 background, 1..20 the classes,
                                                    255 ignore (object borders)
    <root>/ImageSets/Segmentation/train_aug.txt     10,582 training ids; train.txt 1,464; val.txt 1,449
    <root>/cls_labels.npy                           optional: pickled dict {id: float32 (20,) multi-hot, no background}
    <root>/Annotations/<id>.xml                     needed only when there is no cls_labels.npy

A list is one id per line; the official repos' lines ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` are read
too (the id is the first path's stem), and a list argument may be the path of any ``.txt`` (e.g. the repo's
``voc12/train_aug.txt``). Image-level labels come from ``cls_labels`` (an argument naming the file), else
``<root>/cls_labels.npy``, else ``<root>/voc12/cls_labels.npy`` (where the official repos keep it; IRN's integer
keys ``2007000032`` are matched too), else from every ``<object><name>`` of ``Annotations/<id>.xml``, as the official
``make_cls_labels.py`` builds the file (difficult and truncated objects included).

Weak supervision: training items carry the image and its labels only. The masks are read for the evaluation sets
(``pseudo_eval_list``: VOC's train, the images whose CAM pseudo masks are scored; ``val_list``) and, in stage 2, for
training from ``pseudo_mask_dir`` (a segmentation net trained on exported pseudo masks). ``save_palette_png`` writes
masks in VOC's palette for export. ``DigitCanvasWSSSDataModule`` is the embedded default: digits on canvases,
generated in this very layout (``datamodules.generated.wsss_digit_canvas``) and read back with the same code.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from datamodules.base import (IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, DatasetNotFoundError, ZooDataModule,
                              read_image, require_path)
# generated sets import only the shared layer, so VOC's colour map lives with the generator that also writes it
from datamodules.generated.wsss_digit_canvas import VOC_PALETTE, save_palette_png, write_wsss_digit_canvas

__all__ = ["VOC_CLASSES", "VOC_PALETTE", "IGNORE_INDEX", "WSSS_LAYOUT", "save_palette_png", "read_id_list",
           "read_class_labels", "read_mask", "RandomResizeLong", "wsss_transform", "WSSSDataset", "WSSSDataModule",
           "DigitCanvasWSSSDataModule"]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

#: mask value of pixels no loss or metric counts (VOC's object borders, the crop's padding)
IGNORE_INDEX = 255

WSSS_LAYOUT = """\
  <root>/JPEGImages/<id>.jpg                     the images (or <id>.png)
  <root>/SegmentationClassAug/<id>.png           indexed PNG: 0 background, 1..C classes, 255 ignore
  <root>/ImageSets/Segmentation/<list>.txt       one id per line: train_aug (10,582), train (1,464), val (1,449)
  <root>/cls_labels.npy                          optional pickled dict {id: float32 (C,) multi-hot, no background}
  <root>/Annotations/<id>.xml                    VOC xml, read for the labels when there is no cls_labels.npy"""
WSSS_HOW_TO_GET = ("VOCtrainval_11-May-2012.tar (host.robots.ox.ac.uk/pascal/VOC/voc2012) extracted, with "
                   "SegmentationClassAug.zip (the SBD masks converted to VOC's format, linked from the SEAM / wseg "
                   "READMEs) unzipped into VOC2012/, which is <root>; train_aug.txt and cls_labels.npy come with "
                   "the official repo's voc12/ folder")

_IMAGE_ENDINGS = (".jpg", ".png")


def _files_in(folder: Path) -> set[str]:
    """The names in ``folder`` (empty when it is missing): one listing instead of a ``stat`` per id on 10k ids."""
    try:
        return {entry.name for entry in os.scandir(folder)}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _first_missing(names: Sequence[str], present: Sequence[bool], what: str) -> str:
    missing = [n for n, ok in zip(names, present) if not ok]
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    return f"{len(missing)} of {len(names)} ids have no {what}: {', '.join(repr(m) for m in missing[:3])}{more}"


# ---- reading the files --------------------------------------------------------------------------------------------


def _list_path(root: Path, name_or_path: str) -> Path:
    """``<root>/ImageSets/Segmentation/<name>.txt`` for a list name, or the file itself for a path to a ``.txt``."""
    if name_or_path.endswith(".txt") or os.sep in name_or_path or "/" in name_or_path:
        return Path(name_or_path).expanduser()
    return root / "ImageSets" / "Segmentation" / f"{name_or_path}.txt"


def read_id_list(path: str | Path) -> list[str]:
    """The ids of a list file: the first token of every non-empty line, reduced to its stem when it is a path (the
    official ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` lines).

    Raises:
        DatasetNotFoundError: the file is missing (with the expected layout).
        ValueError: the list is empty or names an id twice.
    """
    path = require_path(path, "WSSS id list", WSSS_LAYOUT, WSSS_HOW_TO_GET)
    ids = []
    for line in path.read_text().splitlines():
        token = line.split()[0] if line.split() else ""
        if token:
            ids.append(Path(token).stem if "/" in token or token.lower().endswith(_IMAGE_ENDINGS) else token)
    if not ids:
        raise ValueError(f"'{path}' lists no ids (expected one image id per line)")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        for name in ids:
            if name in seen:
                raise ValueError(f"'{path}' lists the id {name!r} more than once")
            seen.add(name)
    return ids


def _find_cls_labels(root: Path, cls_labels: Optional[str]) -> Optional[Path]:
    if cls_labels is not None:
        return require_path(cls_labels, "cls_labels file", WSSS_LAYOUT, WSSS_HOW_TO_GET)
    for candidate in (root / "cls_labels.npy", root / "voc12" / "cls_labels.npy"):
        if candidate.is_file():
            return candidate
    return None


def _labels_from_npy(path: Path, ids: Sequence[str], num_classes: int) -> np.ndarray:
    try:
        table = np.load(path, allow_pickle=True).item()
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"cannot read '{path}' as a pickled dict {{id: multi-hot}} (np.save of a dict): "
                         f"{err}") from err
    if not isinstance(table, dict):
        raise ValueError(f"'{path}' holds a {type(table).__name__}, not a dict {{id: multi-hot}}")
    rows, present = [], []
    int_keys = bool(table) and isinstance(next(iter(table)), (int, np.integer))
    for name in ids:
        # IRN's copy of the file keys the ids as integers: 2007_000032 -> 2007000032
        key = int(name.replace("_", "")) if int_keys and name.replace("_", "").isdigit() else name
        row = table.get(key)
        present.append(row is not None)
        rows.append(row)
    if not all(present):
        raise ValueError(f"'{path}': {_first_missing(ids, present, 'label entry')}")
    labels = np.zeros((len(ids), num_classes), dtype=np.float32)
    for i, (name, row) in enumerate(zip(ids, rows)):
        row = np.asarray(row, dtype=np.float32).reshape(-1)
        if row.size != num_classes:
            raise ValueError(f"'{path}': the entry of {name!r} has {row.size} values, expected {num_classes} "
                             "(one per foreground class, no background)")
        labels[i] = row
    return labels


def _labels_from_xml(root: Path, ids: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    folder = root / "Annotations"
    present_names = _files_in(folder)
    present = [f"{name}.xml" in present_names for name in ids]
    if not all(present):
        raise DatasetNotFoundError(
            f"no cls_labels.npy in '{root}' (nor in its voc12/, nor given as cls_labels) and '{folder}': "
            f"{_first_missing(ids, present, 'annotation xml')}.\nExpected layout:\n{WSSS_LAYOUT}\n"
            f"How to get it: {WSSS_HOW_TO_GET}")
    column = {name: c for c, name in enumerate(class_names)}
    labels = np.zeros((len(ids), len(class_names)), dtype=np.float32)
    for i, name in enumerate(ids):
        path = folder / f"{name}.xml"
        try:
            objects = ET.parse(path).getroot().iter("object")
        except (ET.ParseError, OSError) as err:
            raise ValueError(f"'{path}': cannot parse the annotation xml ({err})") from err
        for obj in objects:  # <object><name> only: <part><name> (head, hand, foot) are not classes
            label = (obj.findtext("name") or "").strip()
            if label not in column:
                raise ValueError(f"'{path}': object class {label!r} is not one of class_names {list(class_names)}")
            labels[i, column[label]] = 1.0
    return labels


def read_class_labels(root: str | Path, ids: Sequence[str], class_names: Sequence[str],
                      cls_labels: Optional[str] = None) -> np.ndarray:
    """The ``(N, C)`` float32 multi-hot image labels of ``ids`` (C foreground classes, no background), from the
    cls_labels file when there is one, else from the annotation xml (see the module docstring).

    Raises:
        DatasetNotFoundError: neither source exists for some id.
        ValueError: the file lacks an id, has rows of another length, or an xml names an unknown class.
    """
    root = Path(root).expanduser()
    path = _find_cls_labels(root, cls_labels)
    if path is not None:
        return _labels_from_npy(path, ids, len(class_names))
    return _labels_from_xml(root, ids, class_names)


def read_mask(path: str | Path, num_classes: int) -> np.ndarray:
    """A mask PNG as ``(H, W)`` uint8 class ids, checked to hold only 0..``num_classes`` and 255.

    Indexed PNGs give their palette indices (VOC's ``SegmentationClassAug``), grey ones their values; colour PNGs are
    refused: converting colours to ids needs the palette, and a silently wrong mapping would score garbage.

    Raises:
        CorruptImageError: the file cannot be decoded, or is not a single-channel 8-bit image.
        ValueError: a value outside 0..num_classes and 255 (naming the file and the value).
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L"):
                raise CorruptImageError(f"'{path}': a mask must be an indexed (P) or grey (L) 8-bit PNG of class ids, "
                                        f"got mode {img.mode}")
            mask = np.array(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise CorruptImageError(f"cannot decode mask '{path}': {err}") from err
    bad = (mask > num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        values = np.unique(mask[bad])
        raise ValueError(f"'{path}': mask value {int(values[0])} is not a class id (allowed 0..{num_classes} and "
                         f"{IGNORE_INDEX}; bad values {values[:5].tolist()})")
    return mask


# ---- transforms ---------------------------------------------------------------------------------------------------


class RandomResizeLong(v2.Transform):
    """Resize so that the long side is an integer drawn uniformly from ``[low, high]`` (SEAM's ``RandomResizeLong``);
    images bicubic as the official code, masks by nearest neighbour at pixel centres (``NEAREST_EXACT``, as PIL's
    nearest): torch's plain ``NEAREST`` takes ``floor(i · scale)`` and shifts an enlarged mask by up to a pixel
    against the bicubic image."""

    def __init__(self, low: int, high: int) -> None:
        super().__init__()
        if not 0 < low <= high:
            raise ValueError(f"RandomResizeLong: need 0 < low ≤ high, got ({low}, {high})")
        self.low, self.high = int(low), int(high)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = next(TF.get_size(x) for x in flat_inputs if isinstance(x, (tv_tensors.Image, tv_tensors.Mask)))
        long_side = int(torch.randint(self.low, self.high + 1, ()))
        scale = long_side / max(height, width)
        return {"size": [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        mode = v2.InterpolationMode.NEAREST_EXACT if isinstance(inpt, tv_tensors.Mask) else v2.InterpolationMode.BICUBIC
        return self._call_kernel(TF.resize, inpt, size=params["size"], interpolation=mode, antialias=True)


def wsss_transform(train: bool, mean: Sequence[float], std: Sequence[float], crop_size: int = 448,
                   resize_long: Optional[Sequence[int]] = (448, 768), hflip: bool = True,
                   color_jitter: Optional[Sequence[float]] = (0.3, 0.3, 0.3, 0.1)) -> v2.Compose:
    """The joint transform of a ``tv_tensors.Image`` (uint8) and optionally a ``tv_tensors.Mask``.

    Training (SEAM's VOC recipe, in its order): ``RandomResizeLong``, horizontal flip, colour jitter (image only),
    to float and normalise, then a random ``crop_size`` square crop; a side shorter than the crop is zero-padded
    (after normalisation: the mean colour) at a random offset, the mask with 255 so that no loss counts the padding.
    Evaluation: to float and normalise only, no geometric change (masks are scored at the image's own size).
    """
    steps: list[Any] = []
    if train:
        if resize_long is not None:
            steps.append(RandomResizeLong(*resize_long))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        if color_jitter is not None:
            steps.append(v2.ColorJitter(*color_jitter))
    steps += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.Normalize(mean, std)]
    if train:
        steps.append(v2.RandomCrop(crop_size, pad_if_needed=True,
                                   fill={tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE_INDEX}))
    return v2.Compose(steps)


# ---- the dataset ---------------------------------------------------------------------------------------------------


class WSSSDataset(Dataset):
    """Images of an id list with their image-level labels and, when ``mask_files`` is given, their masks.

    Item ``i``: ``{"image": float (3, H, W) normalised, "labels": float (C,) multi-hot (no background), "index": i,
    "name": id}``, plus ``"mask"``: long (H, W), 0 background, 1..C classes, 255 ignore, when the set has masks. The
    ``transform`` (``wsss_transform``) is applied to image and mask jointly.

    Raises (per item): ``CorruptImageError`` for an undecodable file, ``ValueError`` for a mask of another size than
    its image or with a value that is no class id (both naming the file).
    """

    def __init__(self, names: Sequence[str], image_files: Sequence[str | Path], labels: np.ndarray,
                 transform: Callable, mask_files: Optional[Sequence[str | Path]] = None) -> None:
        if not len(names) == len(image_files) == len(labels) or (mask_files is not None
                                                                   and len(mask_files) != len(names)):
            raise ValueError("WSSSDataset: names, image_files, labels (and mask_files) must have one entry per id")
        self.names, self.image_files = list(names), [str(f) for f in image_files]
        self.mask_files = None if mask_files is None else [str(f) for f in mask_files]
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.float32))
        self.num_classes = self.labels.shape[1]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.names)

    def image_size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of item ``index``'s file, from its header only."""
        try:
            with Image.open(self.image_files[index]) as img:
                return img.height, img.width
        except (UnidentifiedImageError, OSError) as err:
            raise CorruptImageError(f"cannot decode image '{self.image_files[index]}': {err}") from err

    def __getitem__(self, index: int) -> dict[str, Any]:
        pil = read_image(self.image_files[index], "RGB")
        image = TF.pil_to_tensor(pil).as_subclass(tv_tensors.Image)
        item: dict[str, Any] = {"labels": self.labels[index], "index": index, "name": self.names[index]}
        if self.mask_files is None:
            item["image"] = self.transform(image).as_subclass(torch.Tensor)
            return item
        mask_file = self.mask_files[index]
        mask = read_mask(mask_file, self.num_classes)
        if mask.shape != (pil.height, pil.width):
            raise ValueError(f"mask '{mask_file}' is {mask.shape[1]}×{mask.shape[0]} (W×H) but its image "
                             f"'{self.image_files[index]}' is {pil.width}×{pil.height}")
        image, mask_t = self.transform(image, tv_tensors.Mask(torch.from_numpy(mask)))
        item["image"], item["mask"] = image.as_subclass(torch.Tensor), mask_t.as_subclass(torch.Tensor).long()
        return item


# ---- the data modules ----------------------------------------------------------------------------------------------


class WSSSDataModule(ZooDataModule):
    """PASCAL VOC 2012 + SBD for weakly supervised segmentation (layout in the module docstring).

    Training images come with image-level labels only; ``evaluation_sets("val")`` is ``[pseudo_eval_set, val_set]``
    (loader 0 the images whose pseudo masks are scored, VOC's train; loader 1 val), ``"test"`` the val set and
    ``"predict"`` the ``predict_split`` list without masks (items ``name``, ``image``, ``labels``, ``index``: the
    model exports a mask per name, e.g. the pseudo masks of train_aug for stage 2).

    Evaluation images keep their own size, so batches of them stack only when all share one size: with
    ``eval_batch_size > 1`` each evaluation set is checked (from the file headers) when first used and one of varying
    sizes fails there, naming two differing images; VOC is evaluated with ``eval_batch_size: 1`` as the official code.
    Every id of a list is checked at setup to have its image (and, for the sets with masks, its mask).

    Args:
        root: the VOC2012 folder (see the layout).
        class_names: the foreground classes, in the order of the labels and of mask ids 1..C.
        cls_labels: the path of a cls_labels.npy anywhere; ``None`` looks in ``<root>`` and ``<root>/voc12``, then
            falls back to the annotation xml.
        train_list, pseudo_eval_list, val_list, predict_split: list names (``<root>/ImageSets/Segmentation/<name>.txt``)
            or paths of list files.
        crop_size: the training crop (padded when the resized image is smaller).
        resize_long: ``(low, high)`` of ``RandomResizeLong``; ``None`` keeps the size.
        hflip: random horizontal flips in training.
        color_jitter: ``(brightness, contrast, saturation, hue)``; ``None`` for none.
        pseudo_mask_dir: stage 2: a folder of ``<id>.png`` masks (ids as the model exported them) that the training
            items carry as ``"mask"``, transformed jointly with the image.
        batch_size, eval_batch_size, num_workers, pin_memory: see ``ZooDataModule``.
    """

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    ignore_index = IGNORE_INDEX
    palette = VOC_PALETTE

    def __init__(self, root: str, class_names: Sequence[str] = VOC_CLASSES, cls_labels: Optional[str] = None, *,
                 train_list: str = "train_aug", pseudo_eval_list: str = "train", val_list: str = "val",
                 crop_size: int = 448, resize_long: Optional[Sequence[int]] = (448, 768), hflip: bool = True,
                 color_jitter: Optional[Sequence[float]] = (0.3, 0.3, 0.3, 0.1),
                 pseudo_mask_dir: Optional[str] = None, predict_split: str = "train_aug", batch_size: int = 8,
                 eval_batch_size: int = 1, num_workers: int = 0, pin_memory: bool = False) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory)
        if len(class_names) == 0 or len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be distinct and non-empty, got {list(class_names)}")
        if len(class_names) >= IGNORE_INDEX:
            raise ValueError(f"at most {IGNORE_INDEX - 1} classes fit in 8-bit masks with {IGNORE_INDEX} as ignore")
        if resize_long is not None and len(resize_long) != 2:
            raise ValueError(f"resize_long must be (low, high) or None, got {resize_long}")
        self.root, self.class_names, self.cls_labels = root, list(class_names), cls_labels
        self.train_list, self.pseudo_eval_list, self.val_list = train_list, pseudo_eval_list, val_list
        self.predict_split = predict_split
        self.crop_size = int(crop_size)
        self.resize_long = None if resize_long is None else tuple(int(v) for v in resize_long)
        self.hflip = hflip
        self.color_jitter = None if color_jitter is None else tuple(float(v) for v in color_jitter)
        self.pseudo_mask_dir = pseudo_mask_dir
        self.pseudo_eval_set: Optional[WSSSDataset] = None
        self.predict_set: Optional[WSSSDataset] = None
        self._records: dict[str, tuple[list[str], list[Path], np.ndarray]] = {}
        self._sets: dict[tuple[str, str], WSSSDataset] = {}
        self._batchable: set[int] = set()

    def _root(self) -> Path:
        return require_path(self.root, "PASCAL VOC 2012 + SBD (SegmentationClassAug)", WSSS_LAYOUT, WSSS_HOW_TO_GET)

    @property
    def num_classes(self) -> int:
        """The number of foreground classes (no background); raises ``DatasetNotFoundError`` when root is missing."""
        self._root()
        return len(self.class_names)

    # ---- building the sets ----------------------------------------------------------------------------------------

    def _read_list(self, list_name: str) -> tuple[list[str], list[Path], np.ndarray]:
        """ids, image files and labels of a list, every id checked to have an image and a label (cached)."""
        if list_name not in self._records:
            root = self._root()
            list_path = _list_path(root, list_name)
            ids = read_id_list(list_path)
            images = _files_in(root / "JPEGImages")
            files = []
            for name in ids:
                ending = next((e for e in _IMAGE_ENDINGS if name + e in images), None)
                files.append(None if ending is None else root / "JPEGImages" / (name + ending))
            if None in files:
                raise DatasetNotFoundError(
                    f"'{list_path}' lists ids whose image is missing from '{root / 'JPEGImages'}' "
                    f"(<id>.jpg or <id>.png): {_first_missing(ids, [f is not None for f in files], 'image')}")
            try:
                labels = read_class_labels(root, ids, self.class_names, self.cls_labels)
            except (ValueError, DatasetNotFoundError) as err:  # name the list whose ids lack labels
                raise type(err)(f"labels of the ids listed in '{list_path}': {err}") from err
            self._records[list_name] = (ids, files, labels)
        return self._records[list_name]

    def _mask_files(self, folder: Path, list_name: str, ids: Sequence[str], what: str) -> list[Path]:
        present_names = _files_in(folder)
        present = [f"{name}.png" in present_names for name in ids]
        if not all(present):
            raise DatasetNotFoundError(f"{what} '{folder}' lacks masks of ids listed in "
                                       f"'{_list_path(self._root(), list_name)}': "
                                       f"{_first_missing(ids, present, f'{folder}/<id>.png')}")
        return [folder / f"{name}.png" for name in ids]

    def _dataset(self, list_name: str, role: str) -> WSSSDataset:
        """The set of ``list_name`` for ``role``: ``train`` (train transform, pseudo masks when set), ``eval`` (GT
        masks) or ``predict`` (no masks)."""
        key = (list_name, role)
        if key not in self._sets:
            ids, files, labels = self._read_list(list_name)
            masks = None
            if role == "eval":
                masks = self._mask_files(self._root() / "SegmentationClassAug", list_name, ids, "the mask folder")
            elif role == "train" and self.pseudo_mask_dir is not None:
                folder = require_path(self.pseudo_mask_dir, "pseudo_mask_dir (the exported pseudo masks)",
                                      "  <pseudo_mask_dir>/<id>.png   one indexed PNG per training id",
                                      "export them with the stage-1 model's predict on train_aug")
                masks = self._mask_files(folder, list_name, ids, "pseudo_mask_dir")
            transform = wsss_transform(role == "train", self.mean, self.std, self.crop_size, self.resize_long,
                                       self.hflip, self.color_jitter)
            self._sets[key] = WSSSDataset(ids, files, labels, transform, masks)
        return self._sets[key]

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit"):
            self.train_set = self._dataset(self.train_list, "train")
        if stage in (None, "fit", "validate"):
            self.pseudo_eval_set = self._dataset(self.pseudo_eval_list, "eval")
            self.val_set = self._dataset(self.val_list, "eval")
        if stage in (None, "test"):
            self.test_set = self._dataset(self.val_list, "eval")
        if stage in (None, "predict"):
            self.predict_set = self._dataset(self.predict_split, "predict")

    def _check_batchable(self, dataset: WSSSDataset) -> None:
        """Evaluation items keep their size, so a batch of several must share one: fail before the first batch."""
        if self.eval_batch_size <= 1 or id(dataset) in self._batchable:
            return
        first = dataset.image_size(0) if len(dataset) else None
        for i in range(1, len(dataset)):
            size = dataset.image_size(i)
            if size != first:
                raise ValueError(
                    f"eval_batch_size={self.eval_batch_size} stacks evaluation images, which keep their own size, "
                    f"but '{dataset.image_files[0]}' is {first[1]}×{first[0]} and '{dataset.image_files[i]}' is "
                    f"{size[1]}×{size[0]} (W×H): set eval_batch_size: 1 (as the official VOC evaluation)")
        self._batchable.add(id(dataset))

    def evaluation_sets(self, split: str) -> WSSSDataset | list[WSSSDataset]:
        if split == "val":
            sets = [self._dataset(self.pseudo_eval_list, "eval"), self._dataset(self.val_list, "eval")]
        elif split == "test":
            sets = [self._dataset(self.val_list, "eval")]
        elif split == "predict":
            sets = [self._dataset(self.predict_split, "predict")]
        else:
            raise ValueError(f"evaluation_sets: split must be 'val', 'test' or 'predict', got {split!r}")
        for dataset in sets:
            self._check_batchable(dataset)
        return sets if split == "val" else sets[0]


class DigitCanvasWSSSDataModule(WSSSDataModule):
    """The embedded default: digits on ``canvas_size``² canvases in VOC's layout (``datamodules.generated.
    wsss_digit_canvas``, generated on first use, no download), read back by ``WSSSDataModule``'s code. Classes
    ``"0"``..``"9"``; train_aug 2,000 canvases, train (the pseudo-mask evaluation set) their first 500, val 500.

    No resize, jitter or flip by default (a flipped digit is another symbol), and the crop is the whole canvas, so
    every batch stacks; all canvases share one size, so evaluation batches do too.

    Args:
        root: where the set is generated (a folder of its own).
        seed, canvas_size, n_train, n_train_eval, n_val, distractor_prob: the generator's (``write_wsss_digit_canvas``).
        the others: see ``WSSSDataModule``; ``crop_size`` ``None`` is the canvas size.
    """

    def __init__(self, root: str = "data/wsss_digit_canvas", *, seed: int = 0, canvas_size: int = 48,
                 n_train: int = 2000, n_train_eval: int = 500, n_val: int = 500, distractor_prob: float = 0.3,
                 crop_size: Optional[int] = None, resize_long: Optional[Sequence[int]] = None, hflip: bool = False,
                 color_jitter: Optional[Sequence[float]] = None, pseudo_mask_dir: Optional[str] = None,
                 predict_split: str = "train_aug", batch_size: int = 32, eval_batch_size: int = 100,
                 num_workers: int = 0, pin_memory: bool = False) -> None:
        super().__init__(root, tuple(str(d) for d in range(10)), None, crop_size=crop_size or canvas_size,
                         resize_long=resize_long, hflip=hflip, color_jitter=color_jitter,
                         pseudo_mask_dir=pseudo_mask_dir, predict_split=predict_split, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, pin_memory=pin_memory)
        self.generator_params = dict(seed=seed, canvas_size=canvas_size, n_train=n_train, n_train_eval=n_train_eval,
                                     n_val=n_val, distractor_prob=distractor_prob)
        self._generated = False

    @property
    def num_classes(self) -> int:
        """Ten digits, known without generating the set."""
        return len(self.class_names)

    def prepare_data(self) -> None:
        write_wsss_digit_canvas(self.root, **self.generator_params)  # a no-op when the set is already there
        self._generated = True

    def _root(self) -> Path:
        if not self._generated:
            self.prepare_data()  # used outside a Trainer (tests, notebooks, benches), or on another node
        return super()._root()
