"""Digit domains: the unpaired-translation embedded default, two styles of scikit-learn's bundled digits, no download.

``sklearn.datasets.load_digits`` ships 1,797 8×8 handwritten digits. This module renders them in two visual domains
and writes them as PNGs in the CycleGAN / U-GAT-IT layout that ``datamodules.gan.UnpairedDataModule`` reads:

    <root>/trainA/<index>.png      domain A, training split (00000.png ...: sklearn's index)
    <root>/trainB/...png           domain B, training split
    <root>/testA/...png            domain A, test split
    <root>/testB/...png            domain B, test split
    <root>/labels.csv              split,file,label: the digit of every file, for evaluation only
    <root>/generated.json          generation parameters, written last (see ``datamodules.generated.install``)

A file's name is its sklearn index, and A and B never hold the same source digit, so the domains are truly
unpaired. The split is stratified (``split_of_every_digit``): every digit class gives ``TEST_FRACTION`` of its
images to the test split, drawn by a seeded permutation, and its images alternate between A and B along that
permutation within each split. The default set has 751 / 749 training and 150 / 147 test images at 32² (about 3 s
to write on one shared CPU core); every digit has 72–77 images per training domain and 14–15 per test domain.
(Version 1 of the set cut sklearn's order at index 1,500, which left only 6–25 images of a digit per test domain.)

- **A, "pen on paper"**: near-white paper (grey 0.86–0.94 per image, faint pixel noise), thin dark ink (grey
  0.05–0.15), greyscale (R = G = B).
- **B, "bold neon on dark"**: a dark background (grey 0.07–0.14) with a soft blotchy texture and noise; bold strokes
  (ink covers 26 % of a B image on average, 13 % of an A image) in a saturated colour drawn per image from
  ``NEON_PALETTE``, with diagonal stripes modulating their brightness and a faint glow around them.

Both domains place the digit the same way: the 8×8 image is upsampled (bicubic) to a box of 70–84 % of the image
side, shifted by up to ±2 px (at 32², scaled with the size) and normalised to its maximum. A stroke mask is cut from
it at 4× the output resolution (at most 128 px): A's at a higher level (0.5) and eroded by half an output pixel,
B's at 0.45 and dilated by ¾ of an output pixel; box-downsampling the mask anti-aliases the edges. So A and B differ
in stroke width, colour, background and texture, while the digit (shape, position and size distribution) is what a
translation must keep, and the labels measure whether it did.

Everything derives from ``numpy.random.default_rng((seed, index))``, so a file's bytes depend only on the parameters.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from datamodules.generated.install import install_generated

__all__ = ["write_digit_domains", "render_digit", "split_of_every_digit", "NEON_PALETTE", "TEST_FRACTION", "SPLITS"]

#: the four folders of the CycleGAN layout
SPLITS = ("trainA", "trainB", "testA", "testB")

#: saturated stroke colours of domain B (RGB)
NEON_PALETTE = ((255, 40, 200), (0, 230, 255), (90, 255, 40), (255, 150, 0), (255, 240, 30), (255, 50, 80),
                (60, 120, 255), (180, 70, 255))
#: the share of every digit class in the test split (297 of the 1,797 digits, as many as version 1 held out)
TEST_FRACTION = 297 / 1797


def split_of_every_digit(labels: np.ndarray, seed: int) -> list[str]:
    """The folder (``trainA``, ``trainB``, ``testA`` or ``testB``) of every digit, stratified by class.

    For each class, a permutation drawn from ``default_rng((seed, "split", class))``: its first
    ``round(n · TEST_FRACTION)`` images are the test split, the rest training, and within each split the images
    alternate between A and B along the permutation (even classes start with A, odd ones with B, so the totals stay
    even too): every class has as many A as B images (±1) in both splits.
    """
    folders = [""] * len(labels)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        order = members[np.random.default_rng((seed, 1, int(label))).permutation(len(members))]
        num_test = int(round(len(members) * TEST_FRACTION))
        for split, part in (("test", order[:num_test]), ("train", order[num_test:])):
            for position, index in enumerate(part):
                folders[index] = split + ("A" if (position + int(label)) % 2 == 0 else "B")
    return folders


def _supersample(size: int) -> int:
    """Masks are built at ``size × factor`` (≈128 px) so that the morphology and the edges are sub-pixel accurate."""
    return max(1, min(4, 128 // size))


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius + 0.5


def _digit_field(digit: np.ndarray, rng: np.random.Generator, size: int, factor: int) -> np.ndarray:
    """The digit upsampled into a ``(size·factor)²`` canvas, scaled and shifted at random, normalised to max 1."""
    big = size * factor
    box = int(round(rng.uniform(0.70, 0.84) * big))
    upsampled = np.asarray(Image.fromarray(digit.astype(np.float32) / 16.0).resize((box, box), Image.BICUBIC))
    shift = rng.uniform(-2.0, 2.0, 2) * size / 32 * factor
    top, left = int(round((big - box) / 2 + shift[1])), int(round((big - box) / 2 + shift[0]))
    canvas = np.zeros((big, big), np.float32)
    t0, l0, t1, l1 = max(top, 0), max(left, 0), min(top + box, big), min(left + box, big)
    canvas[t0:t1, l0:l1] = upsampled[t0 - top : t1 - top, l0 - left : l1 - left]
    # Some digits are written faintly (maximum 8/16): normalising keeps their strokes at both thresholds.
    return canvas / max(float(canvas.max()), 1e-6)


def _downsample(mask: np.ndarray, size: int, factor: int) -> np.ndarray:
    """Box-average ``factor × factor`` cells: a binary mask becomes an anti-aliased coverage in [0, 1]."""
    return mask.astype(np.float32).reshape(size, factor, size, factor).mean((1, 3))


def _render_a(field: np.ndarray, rng: np.random.Generator, size: int, factor: int) -> np.ndarray:
    # A higher threshold and half a pixel of erosion thin the strokes; more of either breaks the faint joins.
    mask = ndimage.binary_erosion(field > 0.5, _disk(max(1, round(0.5 * factor * size / 32))))
    ink = _downsample(mask, size, factor)
    paper = rng.uniform(0.86, 0.94) + rng.normal(0.0, 0.015, (size, size))
    grey = paper * (1 - ink) + rng.uniform(0.05, 0.15) * ink
    return np.repeat(grey[..., None], 3, axis=2)


def _render_b(field: np.ndarray, rng: np.random.Generator, size: int, factor: int) -> np.ndarray:
    # A lower threshold and ¾ of an output pixel of dilation on each side about double A's stroke width; a full
    # pixel starts to close the loops of 6, 8 and 9.
    mask = ndimage.binary_dilation(field > 0.45, _disk(max(1, round(0.75 * factor * size / 32))))
    ink = _downsample(mask, size, factor)[..., None]
    blotches = np.asarray(Image.fromarray(rng.normal(0.0, 1.0, (5, 5)).astype(np.float32)).resize((size, size),
                                                                                                Image.BICUBIC))
    background = rng.uniform(0.07, 0.14) + 0.025 * blotches + rng.normal(0.0, 0.015, (size, size))
    colour = np.asarray(NEON_PALETTE[int(rng.integers(len(NEON_PALETTE)))], np.float32) / 255
    y, x = np.mgrid[:size, :size]
    stripes = 0.75 + 0.25 * np.sin(2 * np.pi * (x + y) / (size / 6) + rng.uniform(0, 2 * np.pi))
    glow = ndimage.uniform_filter(ink[..., 0], max(3, round(5 * size / 32)) | 1)[..., None] * 0.25 * colour
    return background[..., None] * (1 - ink) + colour * stripes[..., None] * ink + glow * (1 - ink)


def render_digit(digit: np.ndarray, domain: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One 8×8 sklearn digit (values 0..16) as a ``(size, size, 3)`` uint8 image of domain ``"A"`` or ``"B"``.

    The placement (scale, shift) is drawn first and the same way in both domains; the style draws come after.
    """
    if domain not in ("A", "B"):
        raise ValueError(f"domain must be 'A' or 'B', got {domain!r}")
    factor = _supersample(size)
    field = _digit_field(digit, rng, size, factor)
    image = (_render_a if domain == "A" else _render_b)(field, rng, size, factor)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def write_digit_domains(root: str | Path, image_size: int = 32, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the two digit domains under ``root`` in the unpaired layout and return ``root``.

    ``datamodules.generated.install`` installs the set: when ``root/generated.json`` matches the parameters (and
    ``overwrite`` is false) nothing is done. Otherwise the set is written to a staging folder and renamed into place
    (replacing a digit-domains set with other parameters, or this one when ``overwrite``), so an interrupted run or a
    concurrent writer never leaves a set that looks complete. ``root`` must not hold anything else.

    Raises:
        ValueError: ``image_size < 16`` (the thin strokes of A would vanish), a negative seed, or ``root`` holds
            something that is not a digit-domains set.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be ≥ 16 for the thin strokes to survive, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be ≥ 0, got {seed}")

    def write(folder: Path) -> None:
        from sklearn.datasets import load_digits  # the bundled copy: no download

        for split in SPLITS:
            (folder / split).mkdir()
        digits = load_digits()
        folders = split_of_every_digit(digits.target, seed)
        rows = []
        for index, (digit, label, split) in enumerate(zip(digits.images, digits.target.tolist(), folders)):
            pixels = render_digit(digit, split[-1], image_size, np.random.default_rng((seed, index)))
            name = f"{index:05d}.png"
            Image.fromarray(pixels).save(folder / split / name)
            rows.append((split, name, label))
        with open(folder / "labels.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("split", "file", "label"))
            writer.writerows(sorted(rows, key=lambda row: (SPLITS.index(row[0]), row[1])))

    return install_generated(root, generator="gan_digit_domains", version=2,
                             params={"image_size": image_size, "seed": seed}, write=write, overwrite=overwrite)
