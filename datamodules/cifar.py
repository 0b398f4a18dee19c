"""CIFAR-10/100 in their python pickle format, read through torchvision, for every family that trains on them.

    <root>/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta      (CIFAR-10)
    <root>/cifar-100-python/train, test, meta                                  (CIFAR-100, fine labels)

``open_cifar`` returns torchvision's dataset without its MD5 pass over every file (at every start): a truncated or
foreign file still fails when it is unpickled, and the error then names the folder and the files it expects.

The batches are pickles, and unpickling runs whatever callable a file names: every batch and meta file is read by
``load_cifar_pickle``, whose unpickler admits only the globals that numpy arrays need (``CIFAR_PICKLE_GLOBALS``) and
refuses any other with ``UnsafePickleError`` before calling it. Each batch must then be a dict with ``data``, uint8
``(N, 3072)``, and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100) of ``N`` integers; anything else is a
``ValueError`` naming the file and that structure.
"""

from __future__ import annotations

import numbers
import pickle
from pathlib import Path
from typing import IO, Any, Callable, Literal, Optional

import numpy as np
import torch
from torchvision import datasets
from torchvision.datasets.vision import VisionDataset

from datamodules.base import require_path

__all__ = [
    "CIFAR_FOLDERS", "CIFAR_PICKLE_GLOBALS", "UnsafePickleError", "load_cifar_pickle", "read_cifar_batch",
    "open_cifar", "read_cifar", "download_cifar",
]

#: the folder each release unpacks to
CIFAR_FOLDERS = {"CIFAR10": "cifar-10-batches-py", "CIFAR100": "cifar-100-python"}
CifarName = Literal["CIFAR10", "CIFAR100"]

#: every global a CIFAR pickle may name: numpy's array reconstruction (``numpy.core`` in the Python-2 release files
#: and numpy 1 pickles, ``numpy._core`` in numpy 2 ones; ``_frombuffer`` for protocol 5) and ``_codecs.encode``,
#: which Python 3 writes for ``bytes`` in protocol 2. Dicts, lists, strings and numbers need no global.
CIFAR_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),
})
BATCH_STRUCTURE = ("a dict with 'data', a uint8 array of shape (N, 3072) (N images, 3 × 32 × 32 channel-major), and "
                   "'labels' (CIFAR-10) or 'fine_labels' (CIFAR-100), a list of N integers")


class UnsafePickleError(pickle.UnpicklingError):
    """A CIFAR pickle names a global that numpy arrays do not need; the message names the file and the global."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR file, resolving only ``CIFAR_PICKLE_GLOBALS``: the callables a pickle can name are all that
    a crafted file could run, so refusing every other one in ``find_class`` refuses it before anything is called.

    ``encoding="latin1"`` decodes the Python-2 ``str`` of the release files: text becomes ``str`` and numpy reads
    the raw array bytes back from it unchanged (as torchvision's own loader does).
    """

    def __init__(self, file: IO[bytes], path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in CIFAR_PICKLE_GLOBALS))
            raise UnsafePickleError(f"'{self.path}' refers to the global '{module}.{name}', which a CIFAR batch never "
                                    f"needs; refused without calling it (allowed: {allowed})")
        return super().find_class(module, name)


def load_cifar_pickle(path: str | Path) -> Any:
    """Unpickle a CIFAR batch or meta file admitting only numpy's array globals (``CIFAR_PICKLE_GLOBALS``).

    Raises:
        UnsafePickleError: the file names another global (e.g. ``os.system``); nothing of it has run.
        pickle.UnpicklingError: the file is truncated or not a pickle; the message names it.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return _CifarUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                OverflowError) as err:
            raise pickle.UnpicklingError(f"'{path}' is not a complete CIFAR pickle ({type(err).__name__}: {err})"
                                         ) from err


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, list[int]]:
    """One batch file as its uint8 ``(N, 3072)`` images and ``N`` labels (``labels`` or CIFAR-100's
    ``fine_labels``), or a ``ValueError`` naming the file, what is wrong and the expected structure."""
    entry = load_cifar_pickle(path)

    def wrong(what: str) -> ValueError:
        return ValueError(f"'{path}' is not a CIFAR python batch: {what}; expected {BATCH_STRUCTURE}")

    if not isinstance(entry, dict):
        raise wrong(f"it holds a {type(entry).__name__}")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data = entry.get("data")
    if data is None:
        raise wrong(f"no 'data' key (keys: {sorted(map(str, entry))})")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shown = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise wrong(f"'data' is a {shown}")
    key = "labels" if "labels" in entry else "fine_labels"
    labels = entry.get(key)
    if labels is None:
        raise wrong(f"neither 'labels' nor 'fine_labels' (keys: {sorted(map(str, entry))})")
    if not isinstance(labels, (list, tuple, np.ndarray)) or not all(isinstance(x, numbers.Integral) for x in labels):
        raise wrong(f"'{key}' is not a list of integers (a {type(labels).__name__})")
    labels = [int(label) for label in labels]
    if len(labels) != len(data):
        raise wrong(f"{len(data)} images in 'data' but {len(labels)} '{key}'")
    if labels and min(labels) < 0:
        raise wrong(f"'{key}' holds the negative label {min(labels)}")
    return data, labels


class _SafeCifarLoading:
    """Reads torchvision's CIFAR files through ``read_cifar_batch`` / ``load_cifar_pickle`` instead of
    ``pickle.load`` (which runs any callable a file names), and replaces its MD5 pass over every batch file (at
    every start) by a presence check.

    A truncated or foreign file still fails, when it is unpickled, and ``open_cifar`` names it then.
    """

    def __init__(self, root: str | Path, train: bool = True, transform: Callable | None = None,
                 target_transform: Callable | None = None, download: bool = False) -> None:
        # torchvision's CIFAR10.__init__ less its pickle.load: the base, the download, then the batches
        VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
        self.train = train
        if download:
            self.download()
        if not self._check_integrity():
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        folder = Path(self.root) / self.base_folder
        batches = [(folder / name, *read_cifar_batch(folder / name))
                   for name, _ in (self.train_list if train else self.test_list)]
        self.data = np.vstack([data for _, data, _ in batches]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = [label for _, _, labels in batches for label in labels]
        self._load_meta()
        for path, _, labels in batches:
            if labels and max(labels) >= len(self.classes):
                raise ValueError(f"'{path}' holds the label {max(labels)}, but '{folder / self.meta['filename']}' "
                                 f"names {len(self.classes)} classes ('{self.meta['key']}')")

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        if not path.is_file():
            raise RuntimeError(f"metadata file {path} is missing")
        meta = load_cifar_pickle(path)
        names = meta.get(self.meta["key"]) if isinstance(meta, dict) else None
        if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
            raise ValueError(f"'{path}' is not a CIFAR meta file: expected a dict whose '{self.meta['key']}' is a "
                             "list of class names")
        self.classes = list(names)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class _CIFAR10(_SafeCifarLoading, datasets.CIFAR10):
    pass


class _CIFAR100(_SafeCifarLoading, datasets.CIFAR100):
    pass


_CLASSES = {"CIFAR10": _CIFAR10, "CIFAR100": _CIFAR100}


def open_cifar(root: str | Path, name: CifarName, train: bool, transform: Optional[Callable] = None):
    """torchvision's ``CIFAR10``/``CIFAR100`` over ``root`` (never downloading), or a clear error naming what is
    missing or corrupt."""
    folder = CIFAR_FOLDERS[name]
    cls = _CLASSES[name]
    require_path(
        Path(root) / folder,
        name,
        f"  <root>/{folder}/  (the python version: data_batch_1..5 / train, test_batch / test, batches.meta / meta)",
        "set `data.init_args.download: true` (needs internet), or unpack the python version from "
        "https://www.cs.toronto.edu/~kriz/cifar.html into <root>",
    )
    try:
        return cls(str(root), train=train, transform=transform, download=False)
    except UnsafePickleError:
        raise  # not corruption: a file that tried to run code, named with its global
    except (RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as err:
        files = ", ".join([n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]])
        raise RuntimeError(
            f"{name} at '{Path(root) / folder}' is incomplete or corrupt (expected readable {files}): "
            f"{type(err).__name__}: {err}"
        ) from err


def read_cifar(root: str | Path, name: CifarName, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split as uint8 ``(N, 3, 32, 32)`` and their labels ``(N,)`` int64."""
    dataset = open_cifar(root, name, train)
    images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2)
    return images, torch.as_tensor(dataset.targets, dtype=torch.int64)


def download_cifar(root: str | Path, name: CifarName) -> None:
    """Fetch both splits into ``root`` with torchvision (needs internet; a no-op when they are there)."""
    for train in (True, False):
        _CLASSES[name](str(root), train=train, download=True)
