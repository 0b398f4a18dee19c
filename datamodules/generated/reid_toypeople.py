"""Procedural "toy people" in Market-1501's layout: the re-ID embedded default, two domains and CamStyle fakes.

Market-1501 (Zheng et al. 2015) is three folders of pedestrian crops named ``<pid>_c<cam>s<seq>_<frame>_<box>.jpg``:
``bounding_box_train/`` (751 identities), ``query/`` and ``bounding_box_test/`` (the gallery, with junk boxes of
person ``-1`` and distractors of person ``0000``); CamStyle adds ``bounding_box_train_camstyle/`` with every training
image re-styled by a CycleGAN into every other camera (``<stem>_fake_<c>to<d>.jpg``). This module writes two such
domains so that ``datamodules.reid`` reads them unchanged:

    <root>/source/{bounding_box_train,bounding_box_test,query,bounding_box_train_camstyle}/   four mild cameras
    <root>/target/{...}/                                                                    four strong cameras
    <root>/generated.json          generation parameters, written last (see ``datamodules.generated.install``)

A person is a small figure (head, torso with a texture, legs, shoes, maybe a backpack or a hat) whose identity is
a distinct combination of upper colour, lower colour, torso texture and its colour, accessory and build; each image
draws it with its own shift, scale, leg spread and background. A camera is a fixed photometric style (colour gains,
gamma, contrast, greyscale mix, blur, noise). The *source* cameras are mild; the *target* cameras are strong and far
from them (a red cast, grey and blurred, dark and flat, a cyan cast with noise), so a model that learnt the source's
colours matches target people across cameras badly; the shape cues (texture, accessory, build, relative
brightness) survive every style. The two domains hold different people.

A CamStyle fake is the *same* clean render (person, pose, background) passed through the other camera's style, plus
a little blur and noise of its own, the stand-in for a CycleGAN translation.

Default size (``seed`` 0): per domain 40 training identities (target: 290 images, 870 fakes; source: 281, 843) and 30
test identities (target: 94 queries, 188 gallery images plus 24 distractors and 12 junk boxes), 64×32 pixels; 2,890
JPEGs in all, written in about 3.5 s on one core. Every file derives from
``numpy.random.default_rng((seed, domain, ...))``, so its bytes depend only on the parameters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from datamodules.generated.install import install_generated

__all__ = ["write_synthetic_reid", "SOURCE_CAMERAS", "TARGET_CAMERAS", "PALETTE"]

PALETTE = np.array([
    (200, 30, 30), (30, 60, 190), (40, 150, 50), (235, 200, 30), (240, 240, 235), (25, 25, 30), (140, 80, 40),
    (150, 60, 170), (240, 130, 20), (120, 125, 130),
], dtype=np.float32) / 255.0
_TEXTURES = ("plain", "stripes", "dots", "band")
_ACCESSORIES = ("none", "backpack", "hat")
_SKIN = np.array([(230, 190, 160), (190, 140, 100), (120, 80, 55)], dtype=np.float32) / 255.0

#: camera style: per-channel gain, gamma, contrast, brightness offset, greyscale mix, blur radius, noise std
SOURCE_CAMERAS = [
    dict(gain=(1.00, 1.00, 1.00), gamma=1.00, contrast=1.00, offset=0.00, grey=0.0, blur=0.0, noise=0.01),
    dict(gain=(1.06, 1.00, 0.94), gamma=0.95, contrast=1.00, offset=0.02, grey=0.0, blur=0.0, noise=0.01),
    dict(gain=(0.94, 1.00, 1.06), gamma=1.05, contrast=0.95, offset=-0.02, grey=0.0, blur=0.0, noise=0.01),
    dict(gain=(1.00, 1.04, 1.00), gamma=1.00, contrast=1.05, offset=0.00, grey=0.1, blur=0.3, noise=0.015),
]
TARGET_CAMERAS = [  # a shared warm, washed-out domain look (blue suppressed, greyer) plus each camera's own
    dict(gain=(1.35, 0.95, 0.65), gamma=0.90, contrast=0.85, offset=0.02, grey=0.30, blur=0.0, noise=0.02),
    dict(gain=(1.00, 0.95, 0.75), gamma=1.00, contrast=0.80, offset=0.03, grey=0.45, blur=0.7, noise=0.02),
    dict(gain=(0.80, 0.70, 0.55), gamma=1.20, contrast=0.70, offset=-0.02, grey=0.30, blur=0.0, noise=0.02),
    dict(gain=(1.20, 1.10, 0.70), gamma=1.00, contrast=0.90, offset=0.00, grey=0.50, blur=0.0, noise=0.05),
]
_SS = 4  # drawn at 4× and downsampled, for anti-aliased edges


def _identities(rng: np.random.Generator, count: int) -> list[dict]:
    """``count`` people with pairwise distinct attribute tuples."""
    space = (len(PALETTE), len(PALETTE), len(_TEXTURES), len(PALETTE), len(_ACCESSORIES), 2)
    codes = rng.choice(int(np.prod(space)), size=count, replace=False)
    people = []
    for code in codes:
        upper, lower, texture, texture_colour, accessory, build = np.unravel_index(int(code), space)
        people.append(dict(upper=int(upper), lower=int(lower), texture=_TEXTURES[texture],
                           texture_colour=int(texture_colour), accessory=_ACCESSORIES[accessory], build=int(build),
                           skin=int(rng.integers(len(_SKIN)))))
    return people


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(round(float(c) * 255)) for c in np.clip(colour, 0, 1))


def _render(person: dict, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One clean (style-free) image of ``person`` as float RGB in [0, 1], ``(height, width, 3)``."""
    h, w = height * _SS, width * _SS
    top, bottom = rng.uniform(0.25, 0.75, 3), rng.uniform(0.25, 0.75, 3)
    ramp = np.linspace(0, 1, h)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp) * np.ones((1, w, 1))
    image = Image.fromarray((background * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 5))):  # clutter behind the person
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.3) * w
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_rgb(rng.uniform(0.2, 0.8, 3)))

    scale = rng.uniform(0.92, 1.08) * h / 64
    cx = w / 2 + rng.uniform(-3, 3) * _SS
    y0 = h * 0.06 + rng.uniform(-2, 2) * _SS
    half = (7.0 if person["build"] == 0 else 9.0) * scale  # torso half-width
    upper, lower = PALETTE[person["upper"]], PALETTE[person["lower"]]
    accent = PALETTE[person["texture_colour"]]
    head_r = 5.0 * scale
    head_cy = y0 + head_r
    torso_top, torso_bottom = head_cy + head_r + 1.5 * scale, head_cy + head_r + 24 * scale
    legs_bottom = torso_bottom + 24 * scale
    spread = rng.uniform(0.5, 4.0) * scale

    if person["accessory"] == "backpack":  # behind the torso, sticking out on one side
        edge = cx + half if rng.random() < 0.5 else cx - half
        draw.rectangle([edge - 4 * scale, torso_top + 2 * scale, edge + 4 * scale, torso_top + 17 * scale],
                       fill=_rgb(np.array([0.35, 0.25, 0.15])))
    for leg in (-1, 1):
        x = cx + leg * (half * 0.45 + spread / 2)
        draw.rectangle([x - 3.2 * scale, torso_bottom - 1, x + 3.2 * scale, legs_bottom], fill=_rgb(lower))
        draw.rectangle([x - 3.6 * scale, legs_bottom - 2 * scale, x + 3.6 * scale, legs_bottom + 1.5 * scale],
                       fill=(30, 30, 30))
    draw.rectangle([cx - half, torso_top, cx + half, torso_bottom], fill=_rgb(upper))
    texture = person["texture"]
    if texture == "stripes":
        for k in range(4):
            y = torso_top + (k + 0.5) * (torso_bottom - torso_top) / 4
            draw.rectangle([cx - half, y - 1.6 * scale, cx + half, y + 1.6 * scale], fill=_rgb(accent))
    elif texture == "dots":
        for row in range(3):
            for column in (-1, 0, 1):
                x, y = cx + column * half * 0.55, torso_top + (row + 0.6) * (torso_bottom - torso_top) / 3.3
                draw.ellipse([x - 1.8 * scale, y - 1.8 * scale, x + 1.8 * scale, y + 1.8 * scale], fill=_rgb(accent))
    elif texture == "band":
        draw.rectangle([cx - 2.2 * scale, torso_top, cx + 2.2 * scale, torso_bottom], fill=_rgb(accent))
    for arm in (-1, 1):
        x = cx + arm * (half + 1.8 * scale)
        draw.rectangle([x - 1.8 * scale, torso_top + 1, x + 1.8 * scale, torso_top + 20 * scale], fill=_rgb(upper))
    draw.ellipse([cx - head_r, head_cy - head_r, cx + head_r, head_cy + head_r], fill=_rgb(_SKIN[person["skin"]]))
    if person["accessory"] == "hat":
        draw.rectangle([cx - head_r * 1.2, head_cy - head_r * 1.2, cx + head_r * 1.2, head_cy - head_r * 0.35],
                       fill=_rgb(accent))
    small = image.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.float32) / 255.0


def _style(clean: np.ndarray, camera: dict, rng: np.random.Generator, extra_blur: float = 0.0) -> Image.Image:
    """The camera's look: gains, gamma, contrast around mid-grey, offset, greyscale mix, blur and sensor noise."""
    x = np.clip(clean * np.asarray(camera["gain"], dtype=np.float32), 0, 1) ** camera["gamma"]
    x = (x - 0.5) * camera["contrast"] + 0.5 + camera["offset"]
    grey = x.mean(axis=2, keepdims=True)
    x = (1 - camera["grey"]) * x + camera["grey"] * grey
    image = Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8))
    radius = camera["blur"] + extra_blur
    if radius > 0:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    noisy = np.asarray(image, dtype=np.float32) / 255 + rng.normal(0, camera["noise"], clean.shape)
    return Image.fromarray((np.clip(noisy, 0, 1) * 255).round().astype(np.uint8))


def _save(image: Image.Image, path: Path) -> None:
    image.save(path, quality=95, subsampling=0)


def _write_domain(root: Path, domain: int, cameras: list[dict], people: list[dict], seed: int, height: int,
                  width: int, num_train_ids: int, num_test_ids: int, num_distractors: int, num_junk: int) -> None:
    for folder in ("bounding_box_train", "bounding_box_test", "query", "bounding_box_train_camstyle"):
        (root / folder).mkdir(parents=True)
    num_cams = len(cameras)
    frame = 0
    for pid in range(1, num_train_ids + num_test_ids + 1):
        person = people[pid - 1]
        rng = np.random.default_rng((seed, domain, pid))
        seen = np.sort(rng.choice(num_cams, size=int(rng.integers(2, num_cams + 1)), replace=False))
        train = pid <= num_train_ids
        for cam in seen.tolist():
            shots = int(rng.integers(2, 4)) if train else 3  # test: one query + two gallery images per camera
            for shot in range(shots):
                frame += 1
                image_rng = np.random.default_rng((seed, domain, pid, cam, shot))
                clean = _render(person, image_rng, height, width)
                stem = f"{pid:04d}_c{cam + 1}s1_{frame:06d}_{shot + 1:02d}"
                folder = "bounding_box_train" if train else ("query" if shot == 0 else "bounding_box_test")
                _save(_style(clean, cameras[cam], image_rng), root / folder / f"{stem}.jpg")
                if train:
                    for other in range(num_cams):
                        if other != cam:
                            fake = _style(clean, cameras[other], image_rng, extra_blur=0.3)
                            _save(fake, root / "bounding_box_train_camstyle" / f"{stem}_fake_{cam + 1}to{other + 1}.jpg")
    for k in range(num_distractors):  # people outside the test identities, labelled 0000
        rng = np.random.default_rng((seed, domain, 2 * 10**6 + k))
        cam = int(rng.integers(num_cams))
        frame += 1
        clean = _render(people[num_train_ids + num_test_ids + k], rng, height, width)
        _save(_style(clean, cameras[cam], rng), root / "bounding_box_test" / f"0000_c{cam + 1}s1_{frame:06d}_00.jpg")
    for k in range(num_junk):  # junk boxes (-1): background and a sliver of someone, dropped by every evaluation
        rng = np.random.default_rng((seed, domain, 10**6 + k))
        cam = int(rng.integers(num_cams))
        frame += 1
        clean = _render(people[int(rng.integers(len(people)))], rng, height, width)
        clean = np.roll(clean, width // 2 + int(rng.integers(2, 6)), axis=1)  # the person cut in half
        _save(_style(clean, cameras[cam], rng), root / "bounding_box_test" / f"-1_c{cam + 1}s1_{frame:06d}_00.jpg")


def write_synthetic_reid(root: str | Path, seed: int = 0, height: int = 64, width: int = 32, num_train_ids: int = 40,
                         num_test_ids: int = 30, num_distractors: int = 24, num_junk: int = 12) -> dict[str, Path]:
    """Write both domains under ``root`` (once: an existing set with the same parameters is kept).

    Returns ``{"source": <root>/source, "target": <root>/target}``. ``datamodules.generated.install`` writes the set
    to a staging folder and renames it into place (replacing a toy-people set with other parameters), so an
    interrupted run or a concurrent writer never leaves a half-written set. ``root`` must not hold anything else.

    Raises:
        ValueError: a parameter out of range, or ``root`` holds something that is not a toy-people set.
    """
    if seed < 0 or height < 32 or width < 16 or num_train_ids < 1 or num_test_ids < 1 or min(num_distractors, num_junk) < 0:
        raise ValueError(f"write_synthetic_reid: need seed ≥ 0, height ≥ 32, width ≥ 16, ≥ 1 train and test identity "
                         f"and ≥ 0 distractors and junk, got seed={seed}, {height}×{width}, {num_train_ids}, "
                         f"{num_test_ids}, {num_distractors}, {num_junk}")
    params = dict(seed=seed, height=height, width=width, num_train_ids=num_train_ids, num_test_ids=num_test_ids,
                  num_distractors=num_distractors, num_junk=num_junk)

    def write(folder: Path) -> None:
        per_domain = num_train_ids + num_test_ids + num_distractors
        people = _identities(np.random.default_rng(seed), 2 * per_domain)  # the two domains hold different people
        for domain, (name, cameras) in enumerate((("source", SOURCE_CAMERAS), ("target", TARGET_CAMERAS))):
            _write_domain(folder / name, domain, cameras, people[domain * per_domain:(domain + 1) * per_domain],
                          seed, height, width, num_train_ids, num_test_ids, num_distractors, num_junk)

    root = install_generated(root, generator="reid_toypeople", version=4, params=params, write=write)
    return {"source": root / "source", "target": root / "target"}
