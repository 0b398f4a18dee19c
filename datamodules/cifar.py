"""CIFAR-10/100 in their python pickle format, read through torchvision, for every family that trains on them.

    <root>/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta      (CIFAR-10)
    <root>/cifar-100-python/train, test, meta                                  (CIFAR-100, fine labels)

``open_cifar`` returns torchvision's dataset without its MD5 pass over every file (at every start): a truncated or
foreign file still fails when it is unpickled, and the error then names the folder and the files it expects.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
from torchvision import datasets

from datamodules.base import require_path

__all__ = ["CIFAR_FOLDERS", "open_cifar", "read_cifar", "download_cifar"]

#: the folder each release unpacks to
CIFAR_FOLDERS = {"CIFAR10": "cifar-10-batches-py", "CIFAR100": "cifar-100-python"}
CifarName = Literal["CIFAR10", "CIFAR100"]


class _FilesPresentCheck:
    """Replaces torchvision's MD5 pass over every CIFAR batch file (at every start) by a presence check.

    A truncated or foreign file still fails, when it is unpickled, and ``CIFAR10DataModule`` names it then.
    """

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        if not path.is_file():
            raise RuntimeError(f"metadata file {path} is missing")
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class _CIFAR10(_FilesPresentCheck, datasets.CIFAR10):
    pass


class _CIFAR100(_FilesPresentCheck, datasets.CIFAR100):
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
    except (RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as err:
        files = ", ".join([n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]])
        raise RuntimeError(
            f"{name} at '{Path(root) / folder}' is incomplete or corrupt (expected readable {files}): {err!r}"
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
