"""The toy-people re-ID generator writes two Market-1501 domains with CamStyle fakes, deterministically; fakes carry
the target camera's colours but keep the person's structure."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.generated import reid_toypeople as toypeople
from datamodules.generated.reid_toypeople import SOURCE_CAMERAS, TARGET_CAMERAS, write_synthetic_reid

MARKET = re.compile(r"^([-\d]+)_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")
FAKE = re.compile(r"^(.+)_fake_(\d)to(\d)\.jpg$")
FOLDERS = ("bounding_box_train", "bounding_box_test", "query", "bounding_box_train_camstyle")
SMALL = dict(num_train_ids=16, num_test_ids=10, num_distractors=6, num_junk=6)
TINY = dict(num_train_ids=3, num_test_ids=2, num_distractors=2, num_junk=2)


@pytest.fixture(scope="module")
def reid(tmp_path_factory):
    return write_synthetic_reid(tmp_path_factory.mktemp("reid"), seed=1, **SMALL)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _records(folder: Path) -> list[tuple[str, int, int]]:
    """(name, pid, camera) for every file of a Market folder, asserting the exact name format."""
    out = []
    for name in _names(folder):
        match = MARKET.match(name)
        assert match, f"{folder.name}/{name} is not a Market-1501 name"
        pid, cam, seq = int(match.group(1)), int(match.group(2)), int(match.group(3))
        assert 1 <= cam <= 4 and seq == 1, name
        assert match.group(1) == "-1" or re.fullmatch(r"\d{4}", match.group(1)), name  # 4-digit ids, junk "-1"
        out.append((name, pid, cam))
    return out


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float64)


def _zgrey(path: Path) -> np.ndarray:
    grey = _load(path) @ np.array([0.299, 0.587, 0.114])
    return (grey - grey.mean()) / grey.std()


def _tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_returns_two_market_domains_and_marker(reid):
    assert set(reid) == {"source", "target"} and reid["source"].parent == reid["target"].parent
    root = reid["source"].parent
    assert sorted(p.name for p in root.iterdir()) == ["generated.json", "source", "target"]
    assert json.loads((root / "generated.json").read_text())["params"]["seed"] == 1
    for domain in reid.values():
        assert sorted(p.name for p in domain.iterdir()) == sorted(FOLDERS)


@pytest.mark.parametrize("domain", ["source", "target"])
def test_names_ids_and_cameras_follow_market(reid, domain):
    folder = reid[domain]
    train, gallery, query = (_records(folder / f) for f in ("bounding_box_train", "bounding_box_test", "query"))
    train_ids = {pid for _, pid, _ in train}
    gallery_ids = {pid for _, pid, _ in gallery} - {0, -1}
    query_ids = {pid for _, pid, _ in query}
    assert train_ids == set(range(1, 17)) and query_ids == set(range(17, 27))
    assert not train_ids & (gallery_ids | query_ids) and gallery_ids == query_ids
    # junk and distractors: in the gallery, nowhere else
    assert sum(pid == -1 for _, pid, _ in gallery) == 6 and sum(pid == 0 for _, pid, _ in gallery) == 6
    assert not {0, -1} & (train_ids | query_ids)
    assert all(name.endswith("_00.jpg") for name, pid, _ in gallery if pid == -1)
    # every train identity in ≥ 2 cameras with 2-3 images each
    for pid in train_ids:
        per_cam = {}
        for _, p, cam in train:
            if p == pid:
                per_cam[cam] = per_cam.get(cam, 0) + 1
        assert len(per_cam) >= 2 and all(2 <= n <= 3 for n in per_cam.values()), (pid, per_cam)
    # one query per test identity and camera, ≥ 2 cameras, two gallery images in each of those cameras
    for pid in query_ids:
        query_cams = [cam for _, p, cam in query if p == pid]
        gallery_cams = [cam for _, p, cam in gallery if p == pid]
        assert len(query_cams) == len(set(query_cams)) >= 2
        assert sorted(gallery_cams) == sorted(query_cams * 2)
    for _, pid, cam in query:  # every query has a true match seen by another camera
        assert any(p == pid and c != cam for _, p, c in gallery)
    # frame numbers are unique per (pid, camera) within a split
    for records in (train, gallery + query):
        keys = [(name.split("_")[0], cam, name.split("_")[2]) for name, _, cam in records]
        assert len(keys) == len(set(keys))


def test_the_market_parser_reads_it(reid):
    from datamodules.reid import CamStyleTargetDataset, parse_reid_folder

    for domain in reid.values():
        train = parse_reid_folder(domain / "bounding_box_train", relabel=True)
        assert sorted(set(train.pids.tolist())) == list(range(16))
        gallery = parse_reid_folder(domain / "bounding_box_test")
        assert -1 not in gallery.pids.tolist() and 0 in gallery.pids.tolist()  # junk dropped, distractors kept
        assert set(parse_reid_folder(domain / "query").cams.tolist()) <= {0, 1, 2, 3}
        CamStyleTargetDataset(train, domain / "bounding_box_train_camstyle", num_cameras=4)  # raises if one is missing


@pytest.mark.parametrize("domain", ["source", "target"])
def test_one_fake_per_other_camera_and_sizes(reid, domain):
    folder = reid[domain]
    expected = {f"{name[:-4]}_fake_{cam}to{other}.jpg"
                for name, _, cam in _records(folder / "bounding_box_train") for other in range(1, 5) if other != cam}
    fakes = _names(folder / "bounding_box_train_camstyle")
    assert len(fakes) == len(set(fakes)) and set(fakes) == expected
    for name in fakes:
        stem, own, other = FAKE.match(name).groups()
        assert MARKET.match(stem + ".jpg") and f"_c{own}s" in stem and own != other
    for sub in FOLDERS:
        for path in (folder / sub).iterdir():
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 64), path


def test_deterministic_idempotent_and_crash_safe(tmp_path, monkeypatch):
    first = write_synthetic_reid(tmp_path / "a", seed=3, **TINY)
    second = write_synthetic_reid(tmp_path / "b", seed=3, **TINY)
    other = write_synthetic_reid(tmp_path / "c", seed=4, **TINY)
    assert _tree_hash(tmp_path / "a") == _tree_hash(tmp_path / "b")
    assert _tree_hash(tmp_path / "a") != _tree_hash(tmp_path / "c")
    a_train, c_train = (sorted((d["target"] / "bounding_box_train").iterdir()) for d in (first, other))
    assert a_train[0].read_bytes() != c_train[0].read_bytes()
    assert second["source"] == tmp_path / "b" / "source"

    marker = tmp_path / "a" / "generated.json"
    image = a_train[0]
    stamps = marker.stat().st_mtime_ns, image.stat().st_mtime_ns
    assert write_synthetic_reid(tmp_path / "a", seed=3, **TINY) == first
    assert (marker.stat().st_mtime_ns, image.stat().st_mtime_ns) == stamps  # nothing rewritten

    def crash(*args, **kwargs):
        raise RuntimeError("interrupted")

    before = _tree_hash(tmp_path / "a")
    monkeypatch.setattr(toypeople, "_write_domain", crash)
    with pytest.raises(RuntimeError, match="interrupted"):  # other parameters, interrupted: the old set is intact
        write_synthetic_reid(tmp_path / "a", seed=5, **TINY)
    assert _tree_hash(tmp_path / "a") == before and json.loads(marker.read_text())["params"]["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # and no staging folder is left
    monkeypatch.undo()
    write_synthetic_reid(tmp_path / "a", seed=4, **TINY)
    assert json.loads(marker.read_text())["params"]["seed"] == 4
    assert _tree_hash(tmp_path / "a") == _tree_hash(tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # the old set was deleted


def test_rejects_bad_parameters(tmp_path):
    for kwargs in ({"seed": -1}, {"height": 16}, {"width": 8}, {"num_train_ids": 0}, {"num_junk": -1}):
        with pytest.raises(ValueError):
            write_synthetic_reid(tmp_path, **kwargs)


def test_identities_are_distinct_within_and_across_domains():
    people = toypeople._identities(np.random.default_rng(0), 400)  # both domains come from one such draw
    keys = [tuple(sorted((k, v) for k, v in p.items() if k != "skin")) for p in people]
    assert len(set(keys)) == 400


def _camera_means(folder: Path) -> dict[int, np.ndarray]:
    per_cam: dict[int, list] = {}
    for name, _, cam in _records(folder / "bounding_box_train"):
        per_cam.setdefault(cam, []).append(_load(folder / "bounding_box_train" / name).mean((0, 1)))
    return {cam: np.mean(v, axis=0) for cam, v in per_cam.items()}


def test_target_cameras_are_a_washed_out_domain_and_differ_more_among_themselves():
    people = toypeople._identities(np.random.default_rng(0), 20)
    clean = [toypeople._render(p, np.random.default_rng(i), 64, 32) for i, p in enumerate(people)]

    def looks(cameras):
        return [np.stack([np.asarray(toypeople._style(x, c, np.random.default_rng(9)), dtype=np.float64) for x in clean])
                for c in cameras]

    source, target = looks(SOURCE_CAMERAS), looks(TARGET_CAMERAS)
    saturation = lambda x: (x.max(-1) - x.min(-1)).mean()  # noqa: E731
    # The same people through every camera: each target camera is greyer than every source camera ...
    assert max(map(saturation, target)) < min(map(saturation, source)) - 4
    # ... and the target cameras differ from one another far more than the source ones do.
    spread = lambda looks: max(np.abs(a.mean((0, 1, 2)) - b.mean((0, 1, 2))).sum() for a in looks for b in looks)  # noqa: E731
    assert spread(target) > 2 * spread(source)


def test_fakes_take_the_target_camera_style(reid):
    target = _camera_means(reid["target"])
    assert len(SOURCE_CAMERAS) == len(TARGET_CAMERAS) == len(target) == 4
    folder = reid["target"]
    to_camera, to_original = [], []
    folder = reid["target"]
    for path in sorted((folder / "bounding_box_train_camstyle").iterdir()):
        stem, _, other = FAKE.match(path.name).groups()
        mean = _load(path).mean((0, 1))
        to_camera.append(np.linalg.norm(mean - target[int(other)]))
        to_original.append(np.linalg.norm(mean - _load(folder / "bounding_box_train" / f"{stem}.jpg").mean((0, 1))))
    to_camera, to_original = np.array(to_camera), np.array(to_original)
    assert to_camera.mean() < 0.5 * to_original.mean()
    assert (to_camera < to_original).mean() > 0.7  # two target cameras are close in mean colour; the rest are not


def test_identity_structure_survives_the_style(reid):
    folder = reid["target"]
    train = _records(folder / "bounding_box_train")
    rng = np.random.default_rng(0)
    own, stranger, sibling = [], [], []
    for path in sorted((folder / "bounding_box_train_camstyle").iterdir()):
        stem, cam, _ = FAKE.match(path.name).groups()
        pid = int(stem[:4])
        fake = _zgrey(path)
        own.append((fake * _zgrey(folder / "bounding_box_train" / f"{stem}.jpg")).mean())
        others = [name for name, p, _ in train if p != pid]
        stranger.append((fake * _zgrey(folder / "bounding_box_train" / others[rng.integers(len(others))])).mean())
        # another image of the same person in the same camera: a different render (pose, background)
        same = [name for name, p, c in train if p == pid and c == int(cam) and name != f"{stem}.jpg"]
        sibling.append((fake * _zgrey(folder / "bounding_box_train" / same[0])).mean())
    own, stranger, sibling = map(np.array, (own, stranger, sibling))
    assert (own > stranger).mean() > 0.95 and own.mean() > stranger.mean() + 0.4
    # the fake is *this* image restyled, not a new picture of the person
    assert (own > sibling).mean() > 0.95
