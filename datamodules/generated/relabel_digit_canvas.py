"""Two-digit canvases labelled by their left digit only, with a teacher's label maps: ReLabel's embedded default.

ImageNet labels one object per image although many images show several, and a random crop often shows none of the
labelled one (Yun et al. 2021, §1). The canvases copy that on purpose: two different digits side by side, the folder
(the label) naming the left one only. A small fully convolutional teacher trained on single digits of the training
split (the "strong teacher" of the paper, here one that has seen clean single objects) is run densely over every
training canvas, and its top-k class scores per cell are stored as label maps in the official ``.pt`` format.

Layout (ImageNet's as ``ReLabelImageFolderDataModule`` reads it, plus the extras of this set):

    <root>/train/<left digit>/<id>.png        canvases (digit_size × 2·digit_size, grey), label = the left digit
    <root>/label_maps/<left digit>/<id>.pt    float32 (2, top_k, h, w): top-k teacher scores, then class indices
    <root>/val/<digit>/<id>.png               single digits of the val split (one object: the hard label is right)
    <root>/test/<digit>/<id>.png              single digits of the test split: each half of a test canvas alone
    <root>/test_canvases.csv                  file, left, right of the whole test canvases
    <root>/test_canvases/<id>.png
    <root>/teacher.json                       the teacher's accuracy on the val digits, and its training settings
    <root>/generated.json                     the parameters, written last (``install_generated``)

The split of the 1,797 digits is ``datamodules.digits.split_indices`` (70 / 10 / 20 %, stratified, ``split_seed``), the
one the digits classifier uses: train canvases and the teacher only ever see training digits, and every test digit
is a writer-disjoint image the student and teacher never saw.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from datamodules.digits import load_digit_images, split_indices
from datamodules.generated.install import install_generated

__all__ = ["write_relabel_digit_canvas", "DigitTeacher"]


class DigitTeacher(nn.Module):
    """A fully convolutional digit classifier: convolutions to a ``(B, 10, h, w)`` score map, averaged to logits for
    training, kept dense for the label maps (the paper's teacher without its global pooling, §3)."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(1, width), *block(width, width), nn.MaxPool2d(2),
                                      *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
                                      *block(2 * width, 4 * width))
        self.classifier = nn.Conv2d(4 * width, 10, 1)

    def dense(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.dense(images).mean(dim=(2, 3))


def _train_teacher(images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> DigitTeacher:
    """AdamW with a cosine schedule on single digits, each shifted by up to 2 px (a padded random crop), so the
    teacher recognises a digit wherever a cell's receptive field meets it."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher = DigitTeacher()
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3, weight_decay=5e-4)
    steps_per_epoch = (len(images) + 63) // 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * steps_per_epoch)
    size = images.shape[-1]
    padded = F.pad(images, (2, 2, 2, 2))
    teacher.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            batch = order[start:start + 64]
            dy, dx = torch.randint(0, 5, (2,), generator=generator).tolist()
            shifted = padded[batch, :, dy:dy + size, dx:dx + size]
            loss = F.cross_entropy(teacher(shifted), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return teacher.eval()


def _pairs(left: np.ndarray, pool: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each left digit, a right digit drawn from ``pool`` with another class."""
    right = rng.choice(pool, size=len(left))
    clash = labels[right] == labels[left]
    while clash.any():
        right[clash] = rng.choice(pool, size=int(clash.sum()))
        clash = labels[right] == labels[left]
    return right


def _save(array: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((array.squeeze(0).numpy() * 255).round().astype(np.uint8), mode="L").save(path)


def write_relabel_digit_canvas(root: str | Path, seed: int = 0, split_seed: int = 0, digit_size: int = 16,
                               canvases_per_digit: int = 2, top_k: int = 3, teacher_epochs: int = 12) -> Path:
    """Write the set described in the module docstring under ``root`` (once per parameter set); return ``root``.

    Every training digit is the left digit of ``canvases_per_digit`` canvases (so the labels keep the digits'
    class balance), its right neighbour a training digit of another class. Each test digit is the left digit of one
    whole test canvas. Label-map cells are ``digit_size / 4`` pixels (the teacher pools twice): a 16 × 32 canvas
    gives 4 × 8 maps.
    """
    if digit_size % 4 or digit_size < 8 or canvases_per_digit < 1 or not 1 <= top_k <= 10 or teacher_epochs < 1:
        raise ValueError(f"write_relabel_digit_canvas: need digit_size a multiple of 4 (≥ 8), canvases_per_digit ≥ 1, "
                         f"1 ≤ top_k ≤ 10, teacher_epochs ≥ 1; got {digit_size}, {canvases_per_digit}, {top_k}, "
                         f"{teacher_epochs}")
    params = dict(seed=seed, split_seed=split_seed, digit_size=digit_size, canvases_per_digit=canvases_per_digit,
                  top_k=top_k, teacher_epochs=teacher_epochs)

    def write(folder: Path) -> None:
        images, labels_t = load_digit_images(digit_size)
        labels = labels_t.numpy()
        train, val, test = split_indices(labels, 0.1, 0.2, split_seed)
        rng = np.random.default_rng(seed)
        # threads: the teacher is small; one thread keeps the set identical on every machine and fast enough
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            teacher = _train_teacher(images[train], labels_t[train], teacher_epochs, seed)
            with torch.no_grad():
                val_acc = float((teacher(images[val]).argmax(-1) == labels_t[val]).float().mean())
            left = np.repeat(train, canvases_per_digit)
            right = _pairs(left, train, labels, rng)
            canvases = torch.cat([images[left], images[right]], dim=-1)  # (N, 1, s, 2s)
            with torch.no_grad():
                scores = torch.cat([teacher.dense(chunk) for chunk in canvases.split(256)])
        finally:
            torch.set_num_threads(threads)
        values, classes = scores.topk(top_k, dim=1)
        label_maps = torch.stack([values, classes.float()], dim=1)  # the official (2, k, h, w) per image
        for i, (canvas, label_map) in enumerate(zip(canvases, label_maps)):
            stem = f"{i:05d}"
            _save(canvas, folder / "train" / str(labels[left[i]]) / f"{stem}.png")
            (folder / "label_maps" / str(labels[left[i]])).mkdir(parents=True, exist_ok=True)
            torch.save(label_map.clone(), folder / "label_maps" / str(labels[left[i]]) / f"{stem}.pt")
        for split, index in (("val", val), ("test", test)):
            for i in index:
                _save(images[i], folder / split / str(labels[i]) / f"{i:04d}.png")
        test_right = _pairs(test, test, labels, rng)
        rows = []
        for i, j in zip(test, test_right):
            name = f"test_canvases/{i:04d}.png"
            _save(torch.cat([images[i], images[j]], dim=-1), folder / name)
            rows.append([name, int(labels[i]), int(labels[j])])
        with open(folder / "test_canvases.csv", "w", newline="") as f:
            csv.writer(f).writerows([["file", "left", "right"], *rows])
        (folder / "teacher.json").write_text(json.dumps(
            {"val_digit_accuracy": round(val_acc, 4), "epochs": teacher_epochs, "seed": seed,
             "trained_on": f"{len(train)} training digits, shifted by up to 2 px"}, indent=1))

    return install_generated(root, generator="relabel_digit_canvas", version=1, params=params, write=write)
