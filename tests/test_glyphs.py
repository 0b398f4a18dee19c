"""The procedural glyph set (``datamodules.generated.fewshot_glyphs``): Omniglot's layout, determinism, caching and class structure."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datamodules.generated.fewshot_glyphs as glyphs
from datamodules.generated.fewshot_glyphs import GLYPHS_VERSION, write_glyph_omniglot

TINY = dict(background_alphabets=2, evaluation_alphabets=1, characters_per_alphabet=3, drawers=4)
# <split>/<Alphabet>/character<NN>/<CCCC>_<DD>.png, as in brendenlake/omniglot's images_*.zip
PNG_PATH = re.compile(
    r"^(images_background|images_evaluation)/(Glyph_Alphabet_(\d{2}))/character(\d{2})/(\d{4})_(\d{2})\.png$"
)


def _pngs(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*.png"))


def _pixels(path: Path, size: int = 28) -> np.ndarray:
    """As the Omniglot baselines see an image: grey, bilinear 28×28, in [0, 1]."""
    return np.asarray(Image.open(path).convert("L").resize((size, size), Image.BILINEAR), np.float32).ravel() / 255


def _classes(root: Path) -> list[list[Path]]:
    chars = sorted({p.parent for p in root.rglob("*.png")})
    return [sorted(c.glob("*.png")) for c in chars]


def test_layout_names_and_png_format(tmp_path):
    root = write_glyph_omniglot(tmp_path / "glyphs", **TINY, image_size=64, seed=3)
    assert root == tmp_path / "glyphs"
    files = _pngs(root)
    assert len(files) == (2 + 1) * 3 * 4
    seen: dict[tuple[str, str], set[str]] = {}
    numbers: dict[tuple[str, str], set[str]] = {}
    for rel in files:
        match = PNG_PATH.match(rel.as_posix())
        assert match, rel
        split, alphabet, alphabet_no, char_no, global_no, drawer = match.groups()
        assert (split == "images_background") == (int(alphabet_no) <= 2)
        assert 1 <= int(char_no) <= 3 and 1 <= int(drawer) <= 4
        seen.setdefault((alphabet, char_no), set()).add(drawer)
        numbers.setdefault((alphabet, char_no), set()).add(global_no)
    assert len(seen) == 9 and all(d == {"01", "02", "03", "04"} for d in seen.values())
    # one global 4-digit number per character folder, 1..9 over the whole set, in alphabet/character order
    assert all(len(n) == 1 for n in numbers.values())
    assert [int(next(iter(numbers[k]))) for k in sorted(numbers)] == list(range(1, 10))
    # nothing but the two image folders and the marker (no staging or temporary files left behind)
    assert sorted(p.name for p in root.iterdir()) == ["generated.json", "images_background", "images_evaluation"]
    assert json.loads((root / "generated.json").read_text()) == {
        "generator": "fewshot_glyphs", "version": GLYPHS_VERSION, "params": {**TINY, "image_size": 64, "seed": 3}}

    for rel in files:
        with Image.open(root / rel) as image:
            assert image.format == "PNG" and image.mode == "1" and image.size == (64, 64)
            ink = ~np.asarray(image)  # mode "1" reads as bool, True = white
        assert 0.01 < ink.mean() < 0.35, f"{rel}: {ink.mean():.3f} of the pixels are strokes"
        # Omniglot-like white background, with the glyph kept off the edges
        assert not ink[:3].any() and not ink[-3:].any() and not ink[:, :3].any() and not ink[:, -3:].any(), rel


def test_background_and_evaluation_alphabets_and_numbers_are_disjoint(tmp_path):
    root = write_glyph_omniglot(tmp_path, background_alphabets=3, evaluation_alphabets=2, characters_per_alphabet=2,
                                drawers=1, image_size=32)
    names, numbers = {}, {}
    for split in ("images_background", "images_evaluation"):
        names[split] = {p.name for p in (root / split).iterdir()}
        numbers[split] = {p.name[:4] for p in (root / split).rglob("*.png")}
    assert names["images_background"] == {"Glyph_Alphabet_01", "Glyph_Alphabet_02", "Glyph_Alphabet_03"}
    assert names["images_evaluation"] == {"Glyph_Alphabet_04", "Glyph_Alphabet_05"}
    assert numbers["images_background"] == {f"{i:04d}" for i in range(1, 7)}
    assert numbers["images_evaluation"] == {f"{i:04d}" for i in range(7, 11)}


def test_same_seed_gives_identical_bytes_and_another_seed_other_images(tmp_path):
    a = write_glyph_omniglot(tmp_path / "a", **TINY, seed=7)
    b = write_glyph_omniglot(tmp_path / "b", **TINY, seed=7)
    c = write_glyph_omniglot(tmp_path / "c", **TINY, seed=8)
    files = _pngs(a)
    assert files == _pngs(b) == _pngs(c)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    differ = sum(not np.array_equal(np.asarray(Image.open(a / f)), np.asarray(Image.open(c / f))) for f in files)
    assert differ == len(files)


def test_an_image_does_not_depend_on_how_many_others_are_generated(tmp_path):
    # every image has its own RNG stream: adding characters, drawers or evaluation alphabets changes nothing else
    small = write_glyph_omniglot(tmp_path / "small", background_alphabets=2, evaluation_alphabets=1,
                                 characters_per_alphabet=2, drawers=2)
    large = write_glyph_omniglot(tmp_path / "large", background_alphabets=2, evaluation_alphabets=2,
                                 characters_per_alphabet=2, drawers=3)
    rel = Path("images_background/Glyph_Alphabet_02/character02/0004_02.png")
    assert (small / rel).read_bytes() == (large / rel).read_bytes()


def test_second_call_is_cached_and_changed_parameters_regenerate(tmp_path):
    root = write_glyph_omniglot(tmp_path, **TINY)
    marker = root / "generated.json"
    stamps = {p: p.stat().st_mtime_ns for p in [marker, *(root / f for f in _pngs(root))]}
    write_glyph_omniglot(str(tmp_path), **TINY)  # str root, same parameters: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    write_glyph_omniglot(root, **{**TINY, "characters_per_alphabet": 2, "drawers": 5})
    files = _pngs(root)
    assert len(files) == 3 * 2 * 5  # the old character03 folders and 4-drawer numbering are gone
    assert not any("character03" in f.as_posix() for f in files)
    assert json.loads(marker.read_text())["params"]["drawers"] == 5

    write_glyph_omniglot(root, **{**TINY, "characters_per_alphabet": 2, "drawers": 5, "image_size": 40})
    with Image.open(root / files[0]) as image:
        assert image.size == (40, 40)


def test_a_root_without_the_marker_is_refused_and_a_deleted_one_regenerated(tmp_path):
    root = write_glyph_omniglot(tmp_path / "glyphs", **TINY)
    (root / "generated.json").unlink()  # now it is someone's folder of images: never deleted
    before = _pngs(root)
    with pytest.raises(ValueError, match="not a 'fewshot_glyphs' set"):
        write_glyph_omniglot(root, **TINY)
    assert _pngs(root) == before

    shutil.rmtree(root)
    write_glyph_omniglot(root, **TINY)
    assert len(_pngs(root)) == 36 and (root / "generated.json").exists()


def test_interrupted_run_keeps_the_old_set_and_leaves_no_partial_folders(tmp_path, monkeypatch):
    root = write_glyph_omniglot(tmp_path / "glyphs", **TINY)
    before = {f: (root / f).read_bytes() for f in [*_pngs(root), "generated.json"]}
    calls = {"n": 0}
    draw = glyphs.draw_instance

    def failing_draw(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return draw(*args, **kwargs)

    monkeypatch.setattr(glyphs, "draw_instance", failing_draw)
    with pytest.raises(KeyboardInterrupt):
        write_glyph_omniglot(root, **{**TINY, "seed": 1})
    assert {f: (root / f).read_bytes() for f in [*_pngs(root), "generated.json"]} == before
    assert [p.name for p in tmp_path.iterdir()] == ["glyphs"]  # the staging folder is gone

    monkeypatch.setattr(glyphs, "draw_instance", draw)
    write_glyph_omniglot(root, **{**TINY, "seed": 1})
    assert json.loads((root / "generated.json").read_text())["params"]["seed"] == 1 and len(_pngs(root)) == 36
    assert sorted(p.name for p in root.iterdir()) == ["generated.json", "images_background", "images_evaluation"]
    assert [p.name for p in tmp_path.iterdir()] == ["glyphs"]


def test_drawings_of_a_character_differ_but_cluster_around_it(tmp_path):
    root = write_glyph_omniglot(tmp_path, background_alphabets=3, evaluation_alphabets=1, characters_per_alphabet=3,
                                drawers=5)
    x = np.stack([[_pixels(p) for p in files] for files in _classes(root)])  # (classes, drawers, 784)
    n_classes, n_drawers = x.shape[:2]
    # every drawer draws differently (the distortion is applied), by a clear margin
    for k in range(n_classes):
        for i in range(n_drawers):
            for j in range(i):
                assert np.abs(x[k, i] - x[k, j]).mean() > 0.02

    means = x.mean(axis=1)
    dist = np.linalg.norm(x[:, :, None, :] - means[None, None], axis=-1)  # (classes, drawers, class means)
    own = dist[np.arange(n_classes), :, np.arange(n_classes)].mean()
    other = dist[~np.eye(n_classes, dtype=bool)[:, None, :].repeat(n_drawers, 1)].mean()
    assert own < 0.8 * other

    # and leave-one-out nearest class mean is far above chance (1/12) yet not trivially perfect
    hits = []
    for k in range(n_classes):
        for i in range(n_drawers):
            loo = means.copy()
            loo[k] = np.delete(x[k], i, axis=0).mean(axis=0)
            hits.append(np.linalg.norm(loo - x[k, i], axis=1).argmin() == k)
    assert 0.4 < np.mean(hits) < 1.0


def test_characters_of_one_alphabet_share_a_style(tmp_path):
    # pixel overlap between class means is larger within an alphabet (shared radicals, anchors and strokes)
    root = write_glyph_omniglot(tmp_path, background_alphabets=6, evaluation_alphabets=0, characters_per_alphabet=4,
                                drawers=3, image_size=56)
    means = np.stack([np.mean([_pixels(p) for p in files], axis=0) for files in _classes(root)])
    alphabet = np.repeat(np.arange(6), 4)
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    off_diagonal = ~np.eye(len(means), dtype=bool)
    same = dist[(alphabet[:, None] == alphabet[None]) & off_diagonal].mean()
    different = dist[alphabet[:, None] != alphabet[None]].mean()
    assert same < different


@pytest.mark.parametrize(
    "bad",
    [
        {"characters_per_alphabet": 0},
        {"characters_per_alphabet": 100},
        {"drawers": 100},
        {"background_alphabets": 0, "evaluation_alphabets": 0},
        {"background_alphabets": -1},
        {"background_alphabets": 600, "evaluation_alphabets": 100, "characters_per_alphabet": 15},  # 10,500 > 9,999
        {"image_size": 8},
        {"seed": -1},
    ],
)
def test_invalid_parameters_are_rejected_before_touching_disk(tmp_path, bad):
    with pytest.raises(ValueError):
        write_glyph_omniglot(tmp_path / "never", **{**TINY, **bad})
    assert not (tmp_path / "never").exists()


def test_float_parameters_are_rejected(tmp_path):
    with pytest.raises(TypeError):
        write_glyph_omniglot(tmp_path, **{**TINY, "drawers": 4.0})

