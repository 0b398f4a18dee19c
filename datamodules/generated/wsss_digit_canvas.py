"""Digits on canvas with image-level labels: the weakly supervised segmentation family's embedded default, written in
the layout of PASCAL VOC 2012 + SBD (``SegmentationClassAug``) so that ``datamodules.wsss`` reads it with VOC's code.

Layout (VOC's, plus the extras of this set):

    <root>/JPEGImages/<id>.png                  RGB canvases, lossless PNG (the VOC reader takes .jpg or .png):
                                                JPEG's ringing would blur the mask edges this set is scored on
    <root>/SegmentationClassAug/<id>.png        indexed PNG in VOC's palette: 0 background, 1 + digit on the digit
    <root>/ImageSets/Segmentation/train_aug.txt the training canvases, one id per line (VOC's 10,582)
    <root>/ImageSets/Segmentation/train.txt     the first ``n_train_eval`` of them: the pseudo-mask evaluation set
                                                (VOC's 1,464 ⊂ train_aug)
    <root>/ImageSets/Segmentation/val.txt       the validation canvases
    <root>/cls_labels.npy                       pickled dict {id: float32 (10,) multi-hot}, as the official repos
    <root>/canvases.json                        per canvas: the sklearn digit indices pasted, their classes and
                                                positions, the distractor bar; and the digit split
    <root>/generated.json                       the parameters, written last (``install_generated``)

**Canvases**: ``canvas_size``² RGB, background noise N(0, ``noise``) per pixel and channel, clipped to [0, 1];
1–``max_digits`` of scikit-learn's 8×8 digits, upsampled ×2 (bilinear, ``load_digit_images(16)``), pasted at random
non-overlapping 16×16 squares (max-blended, each digit in a random bright tint so that colour says nothing of the
class). The mask is ``1 + digit`` where the pasted digit's intensity exceeds 0.25 × that digit's maximum, else 0.
In ``distractor_prob`` of the canvases a label-free thin bright bar (2–3 px thick, 8–20 px long) lies beside the
digits on background (mask 0): a CAM that bleeds onto bright clutter costs precision there.

**Split**: ``datamodules.digits.split_indices`` (70 / 10 / 20 %, stratified, ``split_seed``), the split the digits
classifier uses: training canvases paste only its training digits, validation canvases only the others (its val and
test digits), so the validation masks are scored on writers never seen in training. Canvas ``i`` of a split
depends only on ``(seed, split, i)``.

The VOC colour map (``VOC_PALETTE``) and ``save_palette_png`` live here because generated sets import only the shared
data layer; ``datamodules.wsss`` re-exports them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from datamodules.digits import load_digit_images, split_indices
from datamodules.generated.install import install_generated

__all__ = ["VOC_PALETTE", "voc_palette", "save_palette_png", "write_wsss_digit_canvas", "DIGIT_SIZE"]

#: side of a pasted digit: sklearn's 8×8 upsampled ×2
DIGIT_SIZE = 16


def voc_palette(num: int = 256) -> np.ndarray:
    """PASCAL VOC's colour map ``(num, 3)`` uint8: the bits of index ``i`` interleaved into r, g, b from the most
    significant bit down (1 → (128, 0, 0), 15 → (192, 128, 128), 255 → (224, 224, 192), the ignore border)."""
    index = np.arange(num)
    palette = np.zeros((num, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


#: the standard 256-entry VOC colour map (index 0 black background, 255 the cream ignore colour)
VOC_PALETTE = voc_palette()


def save_palette_png(path: str | Path, mask: np.ndarray) -> None:
    """Write a 2-D mask of class ids (0..255) as an indexed PNG in VOC's palette, as ``SegmentationClassAug`` stores
    them: readers get the ids back from ``np.asarray(Image.open(path))``, viewers see VOC's colours.

    Raises:
        ValueError: ``mask`` is not 2-D or holds values outside 0..255.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"save_palette_png('{path}'): need a 2-D (H, W) mask of class ids, got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"save_palette_png('{path}'): class ids must be 0..255, got {mask.min()}..{mask.max()}")
        mask = mask.astype(np.uint8)
    height, width = mask.shape
    # frombytes: an indexed image whose bytes are the ids themselves (converting "L" to "P" would re-quantise)
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(mask).tobytes())
    image.putpalette(VOC_PALETTE.tobytes())
    image.save(path)


def _free_spot(rng: np.random.Generator, boxes: list[tuple[int, int, int, int]], canvas_size: int, height: int,
               width: int, attempts: int = 100) -> Optional[tuple[int, int]]:
    """A top-left ``(y, x)`` where a ``height × width`` box overlaps none of ``boxes`` (y, x, h, w), or ``None``."""
    for _ in range(attempts):
        y, x = int(rng.integers(0, canvas_size - height + 1)), int(rng.integers(0, canvas_size - width + 1))
        if all(y + height <= by or by + bh <= y or x + width <= bx or bx + bw <= x for by, bx, bh, bw in boxes):
            return y, x
    return None


def _draw_canvas(rng: np.random.Generator, digits: np.ndarray, pool: np.ndarray, canvas_size: int, max_digits: int,
                 noise: float, distractor_prob: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """One canvas ``(S, S, 3)`` uint8; per pixel the paste that owns it (``(S, S)`` int, -1 for background: the
    caller maps pastes to class ids); and the record of what was pasted where."""
    canvas = np.clip(rng.normal(0.0, noise, (canvas_size, canvas_size, 3)), 0.0, 1.0)
    mask_digit = np.full((canvas_size, canvas_size), -1, dtype=np.int64)  # which paste owns a pixel (-1: none)
    boxes: list[tuple[int, int, int, int]] = []
    pasted = []
    for _ in range(int(rng.integers(1, max_digits + 1))):
        spot = _free_spot(rng, boxes, canvas_size, DIGIT_SIZE, DIGIT_SIZE)
        if spot is None:
            break  # no room left; canvases of DIGIT_SIZE × 3 always fit three
        y, x = spot
        index = int(pool[rng.integers(len(pool))])
        digit = digits[index]
        tint = rng.uniform(0.55, 1.0, 3)
        region = canvas[y:y + DIGIT_SIZE, x:x + DIGIT_SIZE]
        np.maximum(region, digit[:, :, None] * tint, out=region)
        foreground = digit > 0.25 * digit.max()
        mask_digit[y:y + DIGIT_SIZE, x:x + DIGIT_SIZE][foreground] = len(pasted)
        boxes.append((y, x, DIGIT_SIZE, DIGIT_SIZE))
        pasted.append({"digit_index": index, "y": y, "x": x})
    distractor = None
    if rng.random() < distractor_prob:
        thickness, length = int(rng.integers(2, 4)), int(rng.integers(8, 21))
        height, width = (thickness, length) if rng.random() < 0.5 else (length, thickness)
        spot = _free_spot(rng, boxes, canvas_size, height, width)
        if spot is not None:  # on background only: the bar must not change a digit's pixels or mask
            y, x = spot
            canvas[y:y + height, x:x + width] = rng.uniform(0.55, 1.0, 3)
            distractor = {"y": y, "x": x, "height": height, "width": width}
    image = (np.clip(canvas, 0.0, 1.0) * 255).round().astype(np.uint8)
    return image, mask_digit, {"digits": pasted, "distractor": distractor}


def write_wsss_digit_canvas(root: str | Path, seed: int = 0, canvas_size: int = 48, n_train: int = 2000,
                            n_train_eval: int = 500, n_val: int = 500, max_digits: int = 3, noise: float = 0.05,
                            distractor_prob: float = 0.3, split_seed: int = 0) -> Path:
    """Write the set described in the module docstring under ``root`` (once per parameter set); return ``root``.

    Raises:
        ValueError: inconsistent sizes, or ``root`` is a non-empty folder that is not a set of this generator.
    """
    if canvas_size < DIGIT_SIZE or not 1 <= max_digits <= (canvas_size // DIGIT_SIZE) ** 2:
        raise ValueError(f"write_wsss_digit_canvas: need canvas_size ≥ {DIGIT_SIZE} and 1 ≤ max_digits ≤ "
                         f"{(max(canvas_size, 0) // DIGIT_SIZE) ** 2} (non-overlapping {DIGIT_SIZE}-px digits must "
                         f"fit); got canvas_size={canvas_size}, max_digits={max_digits}")
    if n_train < 1 or n_val < 1 or not 1 <= n_train_eval <= n_train:
        raise ValueError(f"write_wsss_digit_canvas: need n_train ≥ 1, n_val ≥ 1 and 1 ≤ n_train_eval ≤ n_train; got "
                         f"{n_train}, {n_val}, {n_train_eval}")
    if not 0 <= distractor_prob <= 1 or not 0 <= noise <= 1 or seed < 0:
        raise ValueError(f"write_wsss_digit_canvas: need 0 ≤ distractor_prob ≤ 1, 0 ≤ noise ≤ 1, seed ≥ 0; got "
                         f"{distractor_prob}, {noise}, {seed}")
    params = dict(seed=seed, canvas_size=canvas_size, n_train=n_train, n_train_eval=n_train_eval, n_val=n_val,
                  max_digits=max_digits, noise=noise, distractor_prob=distractor_prob, split_seed=split_seed)

    def write(folder: Path) -> None:
        images, labels_t = load_digit_images(DIGIT_SIZE)
        digits, labels = images[:, 0].numpy(), labels_t.numpy()
        train, val, test = split_indices(labels, 0.1, 0.2, split_seed)
        pools = {"train": train, "val": np.sort(np.concatenate([val, test]))}
        for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
            (folder / sub).mkdir(parents=True)
        cls_labels, records, lists = {}, {}, {}
        for code, (split, count) in enumerate((("train", n_train), ("val", n_val))):
            names = []
            for i in range(count):
                rng = np.random.default_rng([seed, code, i])
                image, owner, record = _draw_canvas(rng, digits, pools[split], canvas_size, max_digits, noise,
                                                    distractor_prob)
                classes = np.array([labels[p["digit_index"]] for p in record["digits"]], dtype=np.int64)
                for paste, cls in zip(record["digits"], classes):
                    paste["label"] = int(cls)
                mask = np.where(owner >= 0, classes[np.maximum(owner, 0)] + 1, 0).astype(np.uint8)
                name = f"{split}_{i:05d}"
                Image.fromarray(image).save(folder / "JPEGImages" / f"{name}.png", compress_level=1)
                save_palette_png(folder / "SegmentationClassAug" / f"{name}.png", mask)
                multi_hot = np.zeros(10, dtype=np.float32)
                multi_hot[classes] = 1.0
                cls_labels[name], records[name] = multi_hot, record
                names.append(name)
            lists[split] = names
        lists = {"train_aug": lists["train"], "train": lists["train"][:n_train_eval], "val": lists["val"]}
        for list_name, names in lists.items():
            (folder / "ImageSets" / "Segmentation" / f"{list_name}.txt").write_text("\n".join(names) + "\n")
        np.save(folder / "cls_labels.npy", cls_labels, allow_pickle=True)
        (folder / "canvases.json").write_text(json.dumps(
            {"digit_split": {"split_seed": split_seed, "train": train.tolist(), "eval": pools["val"].tolist()},
             "canvases": records}))

    return install_generated(root, generator="wsss_digit_canvas", version=1, params=params, write=write)
