"""Procedural handwritten glyphs in Omniglot's layout: the few-shot embedded default, no download.

Omniglot (Lake, Salakhutdinov & Tenenbaum, Science 2015) holds 1,623 handwritten characters from 50 alphabets, each
drawn once by 20 different people and released as 105×105 1-bit PNGs in two zips: ``images_background`` (30
alphabets, 964 characters) and ``images_evaluation`` (20 alphabets, 659 characters). It is the standard few-shot
benchmark (Vinyals et al. 2016, Snell et al. 2017, Finn et al. 2017), but it has to be downloaded. This module writes
a stand-in with the same structure, so that the Omniglot loader, the few-shot methods and their tests run anywhere:

    <root>/images_background/Glyph_Alphabet_01/character01/0001_01.png   alphabets 01..B
    <root>/images_evaluation/Glyph_Alphabet_<B+1>/character01/....png   alphabets B+1..B+E (names never collide)
    <root>/generated.json                                               generation parameters, written last

``<CCCC>`` is the character's 1-based number over the whole set (as in Omniglot's ``0709_01.png``), ``<DD>`` the
drawer. Images are white (1) with black strokes, mode ``"1"``, like the originals.

What makes it Omniglot-like rather than a set of unrelated shapes:

- an **alphabet** is a style: a small weighted pool of stroke primitives (segments, corners, quadratic/cubic Bézier
  curves, arcs, hooks, loops) with its own length and curvature ranges, stroke-count range, preferred directions,
  how often strokes start on earlier ones, a few places where strokes usually start and one to three "radicals"
  (whole strokes that many of its characters share). Characters of one alphabet therefore look alike: raw-pixel
  5-way 1-shot accuracy is about 51 % within one alphabet against 55 % across alphabets (the few-shot test classes
  come from held-out alphabets, as in Omniglot);
- a **character** (one class) is a fixed, ordered set of 2–5 strokes drawn from that pool, given by control points in
  the unit square;
- a **drawer** (one image) jitters every control point, shifts each stroke a little, distorts the whole glyph with a
  random affine map (rotation, anisotropic scale, shear, translation) and uses their own pen width, so the 20 images
  of a character differ the way 20 people's drawings do.

Everything derives from ``seed`` through ``numpy.random.default_rng`` keyed by (alphabet), (alphabet, character) and
(alphabet, character, drawer), so a file's bytes depend only on the parameters, never on generation order.

The distortion strengths are calibrated so that nearest class mean on raw 28×28 pixels is well above chance but far
from solved: on the default evaluation alphabets 5-way 1-shot 56 %, 5-way 5-shot 84 %, 20-way 1-shot 31 % (600
episodes each; Vinyals et al. 2016 report 42/63/27 % for cosine nearest neighbour on raw pixels of real Omniglot). That
leaves room for a learned metric. The default set (9,600 images, 40 MB) takes 15–25 s to write on one core.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datamodules.generated.install import install_generated

__all__ = ["write_glyph_omniglot", "GLYPHS_VERSION"]

#: bump whenever the drawing changes, so that sets cached under an older version are regenerated
GLYPHS_VERSION = 1

# Distinct first key words for each RNG stream: numpy's SeedSequence pads short entropy with zeros, so (s, a) and
# (s, a, 0) would otherwise draw the same numbers.
_ALPHABET_STREAM, _CHARACTER_STREAM, _DRAWER_STREAM = 1, 2, 3

_KINDS = ("line", "corner", "quad", "cubic", "arc", "hook", "loop")

# Geometry of a drawing, in fractions of the canvas. The character's unit square is drawn into _GLYPH_BOX; after the
# drawer's distortion the glyph is pulled back inside _FIT_MARGIN of every edge (Omniglot glyphs rarely touch edges).
_GLYPH_BOX = (0.17, 0.83)
_FIT_MARGIN = 0.08

# Per-drawer variation, in units of the glyph's unit square unless stated. Calibrated on the raw-pixel baseline
# (nearest class mean on 28×28, 600 episodes, 24 alphabets): 5-way 1-shot 55 %, 5-way 5-shot 83 %, 20-way 1-shot
# 31 %. Without the affine map these rise to 80/97/62 %, without the stroke-level jitter, wobble and turn to 65/90/45 %,
# with a fixed 4 px pen to 60/85/35 %. The 1-shot/5-shot gap is wider than on real Omniglot (42/63 % for raw pixels):
# distortions that average out over five shots dominate here, while real drawers also differ in ways that do not.
_POINT_JITTER = 0.05  # Gaussian σ of every control point
_STROKE_WOBBLE = 0.035  # Gaussian σ of a whole stroke's shift (strokes placed a little apart or too close)
_STROKE_TURN_DEG = 12.0  # Gaussian σ of a stroke's rotation about its centre (a slanted bar, a tilted arc)
_CARE = (0.5, 1.5)  # per-drawer factor on jitter, wobble and turn: some people draw carefully, some sloppily
_ROTATION_DEG = 15.0  # uniform ± range of the whole glyph's rotation
_SCALE = (0.85, 1.15)  # independent x and y scale
_SHEAR = 0.15  # uniform ± range of the horizontal shear (slant)
_TRANSLATE = 0.1  # uniform ± range of the whole glyph's shift
_PEN_PX_AT_105 = (2.5, 5.5)  # pen width range (rounded to whole pixels) at Omniglot's 105 px, scaled with image_size


@dataclasses.dataclass(frozen=True)
class Stroke:
    """One pen stroke: control points and how to interpolate them."""

    curve: str  # "bezier" (one Bernstein curve of degree len-1), "spline" (Catmull-Rom through) or "polyline"
    points: np.ndarray  # (k, 2) control points, x right and y down


@dataclasses.dataclass(frozen=True)
class AlphabetStyle:
    """What the characters of one alphabet have in common."""

    kinds: tuple[str, ...]  # the primitives this alphabet uses
    weights: tuple[float, ...]  # how often each is used
    strokes: tuple[int, int]  # inclusive range of strokes per character
    length: tuple[float, float]  # stroke length range (unit square before normalisation)
    curvature: tuple[float, float]  # Bézier control offset range, relative to the stroke length
    sweep: tuple[float, float]  # arc sweep range, radians
    angle_step: float  # preferred directions are multiples of this (radians); 0 means any direction
    connect: float  # probability that a stroke starts on an earlier stroke of the character
    anchors: np.ndarray  # (k, 2) where the alphabet's free strokes usually start
    reuse: float  # probability that a stroke is one of the alphabet's radicals
    radicals: tuple[Stroke, ...] = ()  # strokes shared by many characters, same shape in the same place


# --------------------------------------------------------------------------------------------------------- styles


def alphabet_style(rng: np.random.Generator) -> AlphabetStyle:
    """Draw an alphabet's style: 2–4 primitives with random weights, its own ranges, anchors and radicals."""
    n_kinds = int(rng.integers(2, 5))
    kinds = tuple(str(k) for k in rng.choice(_KINDS, size=n_kinds, replace=False))
    weights = rng.dirichlet(np.full(n_kinds, 2.0))
    low = int(rng.integers(2, 4))
    high = min(5, low + int(rng.integers(1, 3)))
    length_low = rng.uniform(0.35, 0.6)
    curvature_low = rng.uniform(0.1, 0.35)
    sweep_low = rng.uniform(math.radians(70), math.radians(160))
    # Some scripts are built from horizontal/vertical/diagonal strokes (Korean, Tifinagh), others are free-flowing.
    angle_step = float(rng.choice([0.0, math.pi / 4, math.pi / 6, math.pi / 2], p=[0.4, 0.3, 0.15, 0.15]))
    style = AlphabetStyle(
        kinds=kinds,
        weights=tuple(float(w) for w in weights),
        strokes=(low, high),
        length=(length_low, length_low + rng.uniform(0.15, 0.4)),
        curvature=(curvature_low, curvature_low + rng.uniform(0.15, 0.45)),
        sweep=(sweep_low, min(sweep_low + rng.uniform(math.radians(50), math.radians(150)), math.radians(320))),
        angle_step=angle_step,
        connect=float(rng.uniform(0.4, 0.9)),
        anchors=rng.uniform(0.15, 0.85, size=(int(rng.integers(3, 6)), 2)),
        reuse=float(rng.uniform(0.2, 0.5)),
    )
    # Scripts reuse components (Devanagari's headline, Korean jamo, Tifinagh's dots and rings): the same stroke in
    # the same place in many characters, which makes characters of one alphabet look alike.
    radicals = []
    for _ in range(int(rng.integers(1, 4))):
        kind = str(rng.choice(style.kinds, p=style.weights))
        radicals.append(_primitive(kind, style.anchors[int(rng.integers(len(style.anchors)))], style, rng))
    return dataclasses.replace(style, radicals=tuple(radicals))


# ------------------------------------------------------------------------------------------------------ characters


def _unit(angle: float) -> np.ndarray:
    return np.array([math.cos(angle), math.sin(angle)])


def _rotation(angle: float) -> np.ndarray:
    return np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])


def _direction(style: AlphabetStyle, rng: np.random.Generator) -> float:
    angle = rng.uniform(0.0, 2 * math.pi)
    if style.angle_step:
        # snapped, but not exactly: a hand never draws a perfect grid
        angle = round(angle / style.angle_step) * style.angle_step + rng.normal(0.0, 0.06)
    return angle


def _arc_points(centre: np.ndarray, radius: float, start: float, sweep: float, step: float = math.pi / 2) -> np.ndarray:
    count = max(3, int(math.ceil(abs(sweep) / step)) + 1)
    angles = start + np.linspace(0.0, sweep, count)
    return centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _primitive(kind: str, start: np.ndarray, style: AlphabetStyle, rng: np.random.Generator) -> Stroke:
    """One stroke of the given kind starting at ``start``, shaped by the alphabet's ranges."""
    angle = _direction(style, rng)
    length = rng.uniform(*style.length)
    along, normal = _unit(angle), _unit(angle + math.pi / 2)
    side = 1.0 if rng.random() < 0.5 else -1.0
    if kind == "line":
        return Stroke("bezier", np.stack([start, start + length * along]))
    if kind == "corner":
        turn = side * rng.uniform(math.radians(60), math.radians(150))
        if style.angle_step:
            turn = round(turn / style.angle_step) * style.angle_step or side * style.angle_step
        split = rng.uniform(0.35, 0.65)
        knee = start + split * length * along
        return Stroke("polyline", np.stack([start, knee, knee + (1 - split) * length * _unit(angle + turn)]))
    if kind == "quad":
        end = start + length * along
        bend = side * rng.uniform(*style.curvature) * length * 2  # a quadratic's apex reaches half its control offset
        return Stroke("bezier", np.stack([start, (start + end) / 2 + bend * normal, end]))
    if kind == "cubic":
        # independent bend directions give C-shaped (same side) or S-shaped (opposite sides) strokes
        bends = [s * rng.uniform(*style.curvature) * length * 1.5 for s in (side, rng.choice([-1.0, 1.0]))]
        c1 = start + length / 3 * along + bends[0] * normal
        c2 = start + 2 * length / 3 * along + bends[1] * normal
        return Stroke("bezier", np.stack([start, c1, c2, start + length * along]))
    if kind == "arc":
        sweep = rng.uniform(*style.sweep)
        radius = float(np.clip(length / sweep, 0.12, 0.45))
        return Stroke("spline", _arc_points(start - radius * along, radius, angle, side * sweep))
    if kind == "hook":
        # a straight run that curls at its end, tangent to the run
        knee = start + 0.75 * length * along
        radius = rng.uniform(0.1, 0.2) * length + 0.04
        curl = side * rng.uniform(math.radians(120), math.radians(210))
        centre = knee + side * radius * normal
        curl_pts = _arc_points(centre, radius, angle - side * math.pi / 2, curl)
        return Stroke("spline", np.concatenate([start[None], (start + knee)[None] / 2, curl_pts]))
    if kind == "loop":
        # a small closed-ish loop, slightly elliptic, optionally leaving a tail along the stroke direction
        radius = rng.uniform(0.1, 0.18)
        squash = rng.uniform(0.6, 1.0)
        pts = _arc_points(np.zeros(2), radius, 0.0, side * rng.uniform(math.radians(300), math.radians(360)))
        pts = (pts * np.array([1.0, squash])) @ _rotation(angle).T
        pts = pts - pts[0] + start
        if rng.random() < 0.5:
            pts = np.concatenate([pts, pts[-1:] + 0.6 * length * along])
        return Stroke("spline", pts)
    raise ValueError(f"unknown stroke kind {kind!r}")


def make_character(style: AlphabetStyle, rng: np.random.Generator) -> list[Stroke]:
    """A character: an ordered set of strokes from the alphabet's pool, fitted into the unit square."""
    count = int(rng.integers(style.strokes[0], style.strokes[1] + 1))
    strokes: list[Stroke] = []
    unused, free = list(style.radicals), 0
    for _ in range(count):
        # at least one stroke of its own, so that no two characters can be the same set of radicals
        if unused and (free or len(strokes) < count - 1) and rng.random() < style.reuse:
            strokes.append(unused.pop(int(rng.integers(len(unused)))))
            continue
        free += 1
        if strokes and rng.random() < style.connect:
            # handwritten characters are mostly connected: start on an earlier stroke, often at one of its ends
            previous = strokes[int(rng.integers(len(strokes)))]
            curve = sample_stroke(previous, 16)
            at_end = rng.random() < 0.5
            start = curve[[0, -1][int(rng.integers(2))]] if at_end else curve[int(rng.integers(len(curve)))]
        else:
            # free strokes start at the alphabet's usual places, so its characters overlap more than across alphabets
            start = style.anchors[int(rng.integers(len(style.anchors)))] + rng.normal(0.0, 0.05, size=2)
        kind = str(rng.choice(style.kinds, p=style.weights))
        strokes.append(_primitive(kind, start.astype(np.float64), style, rng))
    return _fit_unit_square(strokes)


def _fit_unit_square(strokes: list[Stroke]) -> list[Stroke]:
    """Fit the character into the unit square, moving it as little as possible.

    Full normalisation (scale to fill, centre) would move the alphabet's radicals and anchors differently in every
    character and wash out what its characters share; so the size is only clamped to [0.6, 1] and the character is
    moved half-way to the centre (and then inside the square).
    """
    curves = np.concatenate([sample_stroke(s, 32) for s in strokes])
    low, high = curves.min(axis=0), curves.max(axis=0)
    extent = max(float((high - low).max()), 1e-6)
    scale = float(np.clip(1.0, 0.6 / extent, 1.0 / extent))
    centre = (low + high) / 2
    low, high = 0.5 + scale * (low - centre), 0.5 + scale * (high - centre)
    offset = np.clip(0.5 * (centre - 0.5), -low, 1 - high)
    return [Stroke(s.curve, (s.points - centre) * scale + 0.5 + offset) for s in strokes]


# -------------------------------------------------------------------------------------------------------- drawing


def _bernstein(degree: int, samples: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, samples)[:, None]
    k = np.arange(degree + 1)[None, :]
    binomial = np.array([math.comb(degree, i) for i in range(degree + 1)])[None, :]
    return binomial * t**k * (1 - t) ** (degree - k)


def _catmull_rom(points: np.ndarray, per_segment: int) -> np.ndarray:
    """Uniform Catmull-Rom spline through ``points`` (ends extended by reflection), vectorised over segments."""
    padded = np.concatenate([2 * points[:1] - points[1:2], points, 2 * points[-1:] - points[-2:-1]])
    windows = np.stack([padded[i : i + len(points) - 1] for i in range(4)], axis=1)  # (segments, 4, 2)
    t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
    basis = 0.5 * np.concatenate(
        [-t + 2 * t**2 - t**3, 2 - 5 * t**2 + 3 * t**3, t + 4 * t**2 - 3 * t**3, -(t**2) + t**3], axis=1
    )  # (per_segment, 4)
    curve = np.einsum("sk,nkd->nsd", basis, windows).reshape(-1, 2)
    return np.concatenate([curve, points[-1:]])


def sample_stroke(stroke: Stroke, samples: int = 32) -> np.ndarray:
    """Dense points along a stroke, ``(m, 2)``; curves are affine-invariant, so distortions may follow sampling."""
    if stroke.curve == "bezier":
        return _bernstein(len(stroke.points) - 1, samples) @ stroke.points
    if stroke.curve == "spline":
        return _catmull_rom(stroke.points, max(4, samples // (len(stroke.points) - 1)))
    return stroke.points


def _affine(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A drawer's whole-glyph distortion about the centre: (2×2 matrix, translation)."""
    rotation = _rotation(math.radians(rng.uniform(-_ROTATION_DEG, _ROTATION_DEG)))
    shear = np.array([[1.0, rng.uniform(-_SHEAR, _SHEAR)], [0.0, 1.0]])
    scale = np.diag(rng.uniform(*_SCALE, size=2))
    return rotation @ shear @ scale, rng.uniform(-_TRANSLATE, _TRANSLATE, size=2)


def _fit_canvas(curves: list[np.ndarray], image_size: int, pen: int) -> list[np.ndarray]:
    """Shrink and shift (only when needed) so that the strokes, pen included, stay inside the margin."""
    points = np.concatenate(curves)
    low, high = points.min(axis=0), points.max(axis=0)
    lo_edge = _FIT_MARGIN * image_size + pen / 2
    hi_edge = (1 - _FIT_MARGIN) * image_size - 1 - pen / 2
    centre = (low + high) / 2
    scale = min(1.0, (hi_edge - lo_edge) / max(float((high - low).max()), 1e-6))
    low, high = centre + scale * (low - centre), centre + scale * (high - centre)
    shift = np.maximum(lo_edge - low, 0.0) - np.maximum(high - hi_edge, 0.0)
    return [centre + scale * (c - centre) + shift for c in curves]


def _point_jitter(stroke: Stroke, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian jitter of the control points; correlated between neighbours on splines.

    A spline's control points lie on the curve, and independent jitter would crumple an arc or loop into a zigzag,
    which nobody draws. Smoothing the noise with a (1, 2, 1) kernel keeps the same σ per point but bends the curve.
    """
    count = len(stroke.points)
    if stroke.curve != "spline":
        return rng.normal(0.0, sigma, (count, 2))
    noise = rng.normal(0.0, 1.0, (count + 2, 2))
    return sigma * (noise[:-2] + 2 * noise[1:-1] + noise[2:]) / math.sqrt(6.0)


def draw_instance(strokes: list[Stroke], rng: np.random.Generator, image_size: int) -> Image.Image:
    """One drawer's rendering of a character as a mode-"1" image (white background, black strokes)."""
    pen = max(1, int(round(rng.uniform(*_PEN_PX_AT_105) * image_size / 105)))
    matrix, translation = _affine(rng)
    box_low, box_size = _GLYPH_BOX[0], _GLYPH_BOX[1] - _GLYPH_BOX[0]
    care = rng.uniform(*_CARE)
    curves = []
    for stroke in strokes:
        turn = _rotation(math.radians(rng.normal(0.0, care * _STROKE_TURN_DEG)))
        centre = stroke.points.mean(axis=0)
        points = (stroke.points - centre) @ turn.T + centre + rng.normal(0.0, care * _STROKE_WOBBLE, 2)
        points = points + _point_jitter(stroke, care * _POINT_JITTER, rng)
        curve = sample_stroke(Stroke(stroke.curve, points), 40)
        curve = (curve - 0.5) @ matrix.T + 0.5 + translation
        curves.append((box_low + box_size * curve) * image_size)
    curves = _fit_canvas(curves, image_size, pen)

    image = Image.new("1", (image_size, image_size), 1)
    draw = ImageDraw.Draw(image)
    radius = pen / 2
    for curve in curves:
        draw.line(curve.ravel().tolist(), fill=0, width=pen, joint="curve")
        if pen > 2:  # round pen tips; PIL's wide lines end square
            for x, y in (curve[0], curve[-1]):
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=0)
    return image


# ---------------------------------------------------------------------------------------------------------- files


def _parameters(**kwargs: int) -> dict[str, int]:
    # operator.index rejects floats (and accepts numpy integers, stored as plain ints so they survive json)
    return {name: operator.index(value) for name, value in kwargs.items()}


def _validate(parameters: dict[str, int]) -> None:
    for name in ("background_alphabets", "evaluation_alphabets", "seed"):
        if parameters[name] < 0:
            raise ValueError(f"{name} must be >= 0, got {parameters[name]}")
    if parameters["background_alphabets"] + parameters["evaluation_alphabets"] < 1:
        raise ValueError("at least one alphabet is needed")
    # the layout's two-digit character and drawer numbers and four-digit global character number
    for name, high in (("characters_per_alphabet", 99), ("drawers", 99)):
        if not 1 <= parameters[name] <= high:
            raise ValueError(f"{name} must be in 1..{high}, got {parameters[name]}")
    alphabets = parameters["background_alphabets"] + parameters["evaluation_alphabets"]
    total = alphabets * parameters["characters_per_alphabet"]
    if total > 9999:
        raise ValueError(f"{total} characters do not fit the four-digit character numbers of Omniglot's file names")
    if parameters["image_size"] < 16:
        raise ValueError(f"image_size must be >= 16, got {parameters['image_size']}")


def _write_alphabet(
    folder: Path, alphabet: int, first_character: int, characters: int, drawers: int, image_size: int, seed: int
) -> None:
    style = alphabet_style(np.random.default_rng((seed, _ALPHABET_STREAM, alphabet)))
    for c in range(characters):
        strokes = make_character(style, np.random.default_rng((seed, _CHARACTER_STREAM, alphabet, c)))
        char_dir = folder / f"character{c + 1:02d}"
        char_dir.mkdir(parents=True)
        for d in range(drawers):
            image = draw_instance(strokes, np.random.default_rng((seed, _DRAWER_STREAM, alphabet, c, d)), image_size)
            image.save(char_dir / f"{first_character + c:04d}_{d + 1:02d}.png", format="PNG")


def write_glyph_omniglot(
    root: str | Path,
    *,
    background_alphabets: int = 24,
    evaluation_alphabets: int = 8,
    characters_per_alphabet: int = 15,
    drawers: int = 20,
    image_size: int = 105,
    seed: int = 0,
) -> Path:
    """Write a procedural glyph set under ``root`` in Omniglot's release layout and return ``Path(root)``.

    Background alphabets are ``Glyph_Alphabet_01..B`` in ``images_background``, evaluation alphabets continue the
    numbering (``B+1..B+E``) in ``images_evaluation``; every alphabet has ``characters_per_alphabet`` characters
    drawn by ``drawers`` drawers as ``image_size``² 1-bit PNGs. The same parameters always give byte-identical files.

    ``datamodules.generated.install`` installs the set: when ``root/generated.json`` matches the parameters (and
    ``GLYPHS_VERSION``) nothing is done; otherwise the set is written to a staging folder next to ``root`` and renamed
    into place, replacing a glyph set with other parameters. An interrupted run leaves the previous set (or none),
    and concurrent writers to one ``root`` install one complete set. ``root`` must not hold anything else.

    Raises:
        ValueError: a count outside what the layout's 2- and 4-digit numbers can hold, ``image_size < 16``, or
            ``root`` holds something that is not a glyph set.
    """
    parameters = _parameters(
        background_alphabets=background_alphabets,
        evaluation_alphabets=evaluation_alphabets,
        characters_per_alphabet=characters_per_alphabet,
        drawers=drawers,
        image_size=image_size,
        seed=seed,
    )
    _validate(parameters)

    def write(folder: Path) -> None:
        # alphabets are numbered over both splits: evaluation names and character numbers continue the background ones
        background = parameters["background_alphabets"]
        total = background + parameters["evaluation_alphabets"]
        characters = parameters["characters_per_alphabet"]
        digits = max(2, len(str(total)))  # more than 99 alphabets: widen, so that names still sort in order
        splits = (("images_background", range(background)), ("images_evaluation", range(background, total)))
        for split, alphabets in splits:
            (folder / split).mkdir()
            for a in alphabets:
                _write_alphabet(folder / split / f"Glyph_Alphabet_{a + 1:0{digits}d}", a, a * characters + 1,
                                characters, parameters["drawers"], parameters["image_size"], parameters["seed"])

    return install_generated(root, generator="fewshot_glyphs", version=GLYPHS_VERSION, params=parameters, write=write)
