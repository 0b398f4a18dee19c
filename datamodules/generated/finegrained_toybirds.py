"""Procedural "toy birds" in CUB-200-2011's layout: the fine-grained embedded default, no download.

CUB-200-2011 (Wah et al. 2011) holds 11,788 photographs of 200 North American bird species (5,994 train / 5,794
test) as ``CUB_200_2011/images/<NNN>.<Species>/<Species>_<id>.jpg`` with whitespace-separated metadata files:
``images.txt`` (id, relative path), ``image_class_labels.txt`` (id, 1-based class), ``train_test_split.txt`` (id,
1 = train), ``classes.txt`` (class id, folder name) and ``bounding_boxes.txt`` (id, x, y, width, height). It has to be
downloaded; this module writes a stand-in with exactly that layout, so that ``datamodules.finegrained.CUBDataModule``
reads it unchanged:

    <root>/CUB_200_2011/images/001.Red_Beak_Two_Bars_Straight_Tail/Red_Beak_Two_Bars_Straight_Tail_0001.jpg
    <root>/CUB_200_2011/{images,image_class_labels,train_test_split,classes,bounding_boxes}.txt
    <root>/generated.json    generation parameters, written last (see ``datamodules.generated.install``)

What makes it *fine-grained*: every bird has the same body, head, eye, legs and plumage colours; a class is one
combination of three small parts, beak colour (red / yellow / blue) × white wing bars (two / three) × tail shape
(straight / notched), so every class has a sibling that differs in a single part, a few pixels in size. Each image
draws the bird with its own shift, rotation (±15°), scale (±10 %), facing direction and plumage shade on a cluttered
background of soft blobs and branches, so the parts move around and global statistics say little. A method that
compares pairs of images (API-Net's idea) has a small, localised difference to find.

Raw pixels carry almost no usable signal: on the default set (12 classes, 64 train / 16 test per class, 64×64,
4.4 s to write), nearest class mean on 16×16 RGB pixels scores 7.3 % and standardised logistic regression (C = 0.1)
12.5 % on the test split (chance 8.3 %); the class lives in a few pixels whose position changes from image to image.

Everything derives from ``seed`` through ``numpy.random.default_rng((seed, class, image))``, so a file's bytes
depend only on the parameters. JPEGs are written with quality 95 and no chroma subsampling, so the coloured beak
survives compression.
"""

from __future__ import annotations

import math
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datamodules.generated.install import install_generated

__all__ = ["write_toy_birds", "TOY_BIRD_CLASSES", "BEAK_COLOURS"]

BEAK_COLOURS = {"Red": (225, 35, 30), "Yellow": (245, 205, 20), "Blue": (40, 95, 235)}
_BARS = {"Two": 2, "Three": 3}
_TAILS = ("Straight", "Notched")
#: class id ``i + 1`` is ``TOY_BIRD_CLASSES[i]``
TOY_BIRD_CLASSES = [f"{beak}_Beak_{bars}_Bars_{tail}_Tail" for beak, bars, tail in product(BEAK_COLOURS, _BARS, _TAILS)]

_SUPERSAMPLE = 4  # drawn at 4× and downsampled, for anti-aliased edges


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 40) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _bird_parts(class_name: str) -> list[tuple[np.ndarray, str]]:
    """The bird in unit coordinates (facing right), as (polygon, role) in drawing order."""
    beak, bars, tail = class_name.split("_")[0], class_name.split("_")[2], class_name.split("_")[4]
    if tail == "Notched":
        tail_poly = np.array([[0.34, 0.52], [0.10, 0.44], [0.19, 0.53], [0.10, 0.62], [0.34, 0.60]])
    else:
        tail_poly = np.array([[0.34, 0.52], [0.10, 0.46], [0.10, 0.60], [0.34, 0.60]])
    parts = [
        (np.array([[0.46, 0.64], [0.44, 0.80], [0.47, 0.80], [0.49, 0.64]]), "leg"),
        (np.array([[0.55, 0.64], [0.54, 0.80], [0.57, 0.80], [0.58, 0.64]]), "leg"),
        (tail_poly, "plumage"),
        (_ellipse(0.50, 0.56, 0.20, 0.11), "body"),
        (_ellipse(0.47, 0.53, 0.12, 0.065), "wing"),
    ]
    count = _BARS[bars]
    for k in range(count):  # white bars across the wing, evenly spread over its length
        x = 0.40 + (k + 0.5) * 0.14 / count
        parts.append((np.array([[x - 0.008, 0.48], [x + 0.008, 0.48], [x + 0.008, 0.58], [x - 0.008, 0.58]]), "bar"))
    parts += [
        (_ellipse(0.70, 0.44, 0.085, 0.085), "body"),
        (np.array([[0.775, 0.415], [0.87, 0.445], [0.775, 0.47]]), f"beak:{beak}"),
        (_ellipse(0.725, 0.425, 0.014, 0.014, 12), "eye"),
    ]
    return parts


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = tuple(int(v) for v in rng.integers(150, 230, 3))
    image = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(8, 14))):  # soft foliage blobs
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.05, 0.22, 2) * size
        colour = tuple(int(v) for v in np.clip(np.array(base) + rng.integers(-70, 50, 3), 0, 255))
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
    for _ in range(int(rng.integers(2, 5))):  # branches
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        colour = tuple(int(v) for v in rng.integers(60, 130, 3))
        draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.uniform(0.01, 0.035) * size) + 1)
    return image


def _draw_bird(class_name: str, rng: np.random.Generator, size: int) -> tuple[Image.Image, tuple[float, ...]]:
    big = size * _SUPERSAMPLE
    image = _background(rng, big)
    draw = ImageDraw.Draw(image)
    angle = math.radians(rng.uniform(-15, 15))
    scale = rng.uniform(0.9, 1.1)
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shade = rng.integers(-20, 21)
    colours = {
        "body": tuple(int(v) for v in np.clip(np.array([128, 104, 72]) + shade, 0, 255)),
        "plumage": tuple(int(v) for v in np.clip(np.array([108, 88, 60]) + shade, 0, 255)),
        "wing": tuple(int(v) for v in np.clip(np.array([84, 66, 46]) + shade, 0, 255)),
        "bar": (250, 250, 250), "eye": (15, 15, 15), "leg": (70, 55, 40),
    }
    parts = _bird_parts(class_name)
    points = np.concatenate([poly for poly, _ in parts])
    centre = np.array([0.5, 0.6])

    def transform(poly: np.ndarray) -> np.ndarray:
        p = (poly - centre) * np.array([mirror, 1.0])
        return p @ rotation.T * scale

    extent = transform(points)
    low, high = extent.min(0), extent.max(0)
    # a random position that keeps the whole bird inside the image
    offset = np.array([rng.uniform(-low[0] + 0.02, 0.98 - high[0]), rng.uniform(-low[1] + 0.02, 0.98 - high[1])])
    for poly, role in parts:
        colour = BEAK_COLOURS[role.split(":")[1]] if role.startswith("beak") else colours[role]
        xy = (transform(poly) + offset) * big
        draw.polygon([tuple(p) for p in xy], fill=colour)
    small = image.resize((size, size), Image.LANCZOS)
    x0, y0 = (low + offset) * size
    x1, y1 = (high + offset) * size
    return small, (round(float(x0), 1), round(float(y0), 1), round(float(x1 - x0), 1), round(float(y1 - y0), 1))


def write_toy_birds(
    root: str | Path,
    *,
    image_size: int = 64,
    train_per_class: int = 64,
    test_per_class: int = 16,
    seed: int = 0,
) -> Path:
    """Write the toy-bird set under ``root`` in CUB-200-2011's layout and return ``root/CUB_200_2011``.

    ``datamodules.generated.install.install_generated`` installs it: nothing is done when ``root/generated.json``
    matches the parameters; otherwise the set is written to a staging folder and renamed into place (replacing a
    toy-bird set with other parameters), so an interrupted run or a concurrent writer never leaves a half-written set.
    ``root`` must not hold anything else.

    Raises:
        ValueError: ``image_size < 32``, a count below 1, or ``root`` holds something that is not a toy-bird set.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be ≥ 32 for the parts to stay visible, got {image_size}")
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError(f"train_per_class and test_per_class must be ≥ 1, got {train_per_class}, {test_per_class}")
    params = dict(image_size=image_size, train_per_class=train_per_class, test_per_class=test_per_class, seed=seed)

    def write(folder: Path) -> None:
        cub = folder / "CUB_200_2011"
        (cub / "images").mkdir(parents=True)
        images, labels, splits, boxes = [], [], [], []
        per_class = train_per_class + test_per_class
        for class_index, name in enumerate(TOY_BIRD_CLASSES):
            class_folder = f"{class_index + 1:03d}.{name}"
            (cub / "images" / class_folder).mkdir()
            for image_index in range(per_class):
                rng = np.random.default_rng((seed, class_index, image_index))
                image, box = _draw_bird(name, rng, image_size)
                relative = f"{class_folder}/{name}_{image_index + 1:04d}.jpg"
                image.save(cub / "images" / relative, quality=95, subsampling=0)
                image_id = len(images) + 1
                images.append(f"{image_id} {relative}")
                labels.append(f"{image_id} {class_index + 1}")
                splits.append(f"{image_id} {int(image_index < train_per_class)}")
                boxes.append(f"{image_id} " + " ".join(f"{v:.1f}" for v in box))
        tables = {"images.txt": images, "image_class_labels.txt": labels, "train_test_split.txt": splits,
                  "bounding_boxes.txt": boxes,
                  "classes.txt": [f"{i + 1} {i + 1:03d}.{n}" for i, n in enumerate(TOY_BIRD_CLASSES)]}
        for filename, lines in tables.items():
            (cub / filename).write_text("\n".join(lines) + "\n")

    return install_generated(root, generator="finegrained_toybirds", version=1, params=params,
                             write=write) / "CUB_200_2011"
