"""Digits on canvas: the detection family's embedded default, written as a real COCO-format set.

scikit-learn's bundled 8×8 digits are pasted at 16–40 px onto noisy square canvases; ``DigitCanvasDataModule``
(``datamodules.detection``) reads the result with the same code as COCO. ``datamodules.generated.install`` installs
it (marker ``generated.json``), safely under concurrent writers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.generated.install import install_generated

__all__ = ["resize_digit", "write_digit_canvas"]

_SPLIT_POOLS = {"train": (0, 1400), "val": (1400, 1600), "test": (1600, None)}  # sklearn digit indices: writers


def resize_digit(digit: np.ndarray, size: int) -> np.ndarray:
    """An 8×8 digit in [0, 1] resized (bilinear) to ``size × size``, float32 in [0, 1]."""
    resized = Image.fromarray(np.ascontiguousarray(digit, dtype=np.float32)).resize((size, size), Image.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area, areas = (box[2] - box[0]) * (box[3] - box[1]), (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def _draw_canvas(rng: np.random.Generator, digits: np.ndarray, pool: np.ndarray, canvas_size: int, min_digit: int,
                 max_digit: int, max_digits: int, noise: float) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """One canvas (uint8) and its ``(x, y, size, digit index)`` pastes."""
    canvas = rng.uniform(0.0, noise, (canvas_size, canvas_size)).astype(np.float32)
    placed: list[tuple[int, int, int, int]] = []
    boxes = np.zeros((0, 4))
    for _ in range(int(rng.integers(1, max_digits + 1))):
        for _attempt in range(100):
            size = int(rng.integers(min_digit, max_digit + 1))
            x, y = (int(v) for v in rng.integers(0, canvas_size - size + 1, 2))
            box = np.array([x, y, x + size, y + size], dtype=np.float64)
            if len(boxes) == 0 or _iou(box, boxes).max() < 0.05:
                break
        else:
            break  # this canvas is full enough
        index = int(pool[rng.integers(len(pool))])
        region = canvas[y:y + size, x:x + size]
        np.maximum(region, resize_digit(digits[index], size), out=region)
        placed.append((x, y, size, index))
        boxes = np.concatenate([boxes, box[None]])
    return (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8), placed


def write_digit_canvas(root: str | Path, seed: int = 0, canvas_size: int = 128, num_train: int = 1000,
                       num_val: int = 200, num_test: int = 200, min_digit: int = 16, max_digit: int = 40,
                       max_digits: int = 4, noise: float = 0.3) -> Path:
    """Write the digits-on-canvas detection set under ``root`` in COCO format (once per parameter set); return ``root``.

    Each square grayscale canvas is uniform noise in ``[0, noise)`` with 1..``max_digits`` of scikit-learn's 8×8
    digits (0..16 scaled to [0, 1]) resized (bilinear) to random squares of ``min_digit``..``max_digit`` px and
    max-blended in, placed by rejection sampling so that pasted squares overlap with IoU < 0.05. The box is the
    pasted square, the label the digit. Train canvases draw from digits ``[:1400]``, val from ``[1400:1600]`` and
    test from ``[1600:]``: the evaluation digits come from writers never seen in training. Canvas ``i`` of a split
    depends only on ``(seed, split, i)``.

    Layout (real COCO format; annotations carry the sklearn ``digit_index`` as an extra field):

        <root>/{train,val,test}/000000.png ...
        <root>/annotations/instances_{train,val,test}.json    category ids 1..10 named "0".."9"
        <root>/generated.json                                  the generation parameters, written last

    ``datamodules.generated.install.install_generated`` writes the set into a staging folder and renames it into
    place, so concurrent writers never expose a half-written set and the first one's copy is used; a digit-canvas
    set with other parameters is replaced. ``root`` must not hold anything else.

    Raises:
        ValueError: inconsistent sizes, or ``root`` is a non-empty folder that is not a digit-canvas set.
    """
    if not (1 <= min_digit <= max_digit <= canvas_size) or max_digits < 1 or not 0 < noise <= 1 or seed < 0:
        raise ValueError(f"write_digit_canvas: need 1 ≤ min_digit ≤ max_digit ≤ canvas_size, max_digits ≥ 1, "
                         f"0 < noise ≤ 1, seed ≥ 0; got {min_digit}, {max_digit}, {canvas_size}, {max_digits}, "
                         f"{noise}, {seed}")
    if min(num_train, num_val, num_test) < 0:
        raise ValueError(f"write_digit_canvas: negative split size ({num_train}, {num_val}, {num_test})")
    params = dict(seed=seed, canvas_size=canvas_size, num_train=num_train, num_val=num_val, num_test=num_test,
                  min_digit=min_digit, max_digit=max_digit, max_digits=max_digits, noise=noise)

    def write(folder: Path) -> None:
        from sklearn.datasets import load_digits  # the bundled copy: no download

        digits = load_digits()
        images, targets = digits.images.astype(np.float32) / 16.0, digits.target
        (folder / "annotations").mkdir()
        categories = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
        for code, (split, count) in enumerate((("train", num_train), ("val", num_val), ("test", num_test))):
            (folder / split).mkdir()
            lo, hi = _SPLIT_POOLS[split]
            pool = np.arange(len(images))[lo:hi]
            entries, annotations = [], []
            for i in range(count):
                rng = np.random.default_rng([seed, code, i])
                canvas, placed = _draw_canvas(rng, images, pool, canvas_size, min_digit, max_digit, max_digits, noise)
                name = f"{i:06d}.png"
                Image.fromarray(canvas).save(folder / split / name, compress_level=1)
                entries.append({"id": i, "file_name": name, "width": canvas_size, "height": canvas_size})
                for x, y, size, index in placed:
                    annotations.append({"id": len(annotations) + 1, "image_id": i,
                                        "category_id": int(targets[index]) + 1, "bbox": [x, y, size, size],
                                        "area": size * size, "iscrowd": 0, "digit_index": index})
            coco = {"info": {"description": "digits on canvas (datamodules.detection.write_digit_canvas)"},
                    "images": entries, "annotations": annotations, "categories": categories}
            (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))

    return install_generated(root, generator="detection_digit_canvas", version=1, params=params, write=write)
