"""The installer of the generated sets (``datamodules.generated.install``): written once per parameter set, outdated
sets replaced, foreign folders refused, failures leave nothing behind, and concurrent writers install one set."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datamodules.generated.install import MARKER, install_generated, read_marker

ROOT = Path(__file__).resolve().parents[1]


def _writer(*names: str, calls: list | None = None):
    """A ``write`` that puts one small file per name into the staging folder, counting its calls in ``calls``."""
    def write(folder: Path) -> None:
        if calls is not None:
            calls.append(folder)
        for name in names:
            (folder / name).write_text(f"{name} in {folder.name}")
    return write


def _install(root: Path, write, version: int = 1, **params) -> Path:
    return install_generated(root, generator="toy", version=version, params=params, write=write)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_current_set_is_returned_without_writing(tmp_path):
    root, calls = tmp_path / "sets" / "toy", []
    assert _install(root, _writer("a.txt", calls=calls), size=(2, 3), name="x") == root
    assert sorted(os.listdir(root)) == ["a.txt", MARKER] and len(calls) == 1
    expected = {"generator": "toy", "params": {"name": "x", "size": [2, 3]}, "version": 1}
    assert read_marker(root) == expected
    assert (root / MARKER).read_text() == json.dumps(expected, indent=1, sort_keys=True) + "\n"
    # the staging folder was a unique sibling, renamed into place
    assert calls[0].parent == root.parent and calls[0].name.startswith(".toy.") and calls[0].name.endswith(".partial")

    stamps = {p: p.stat().st_mtime_ns for p in root.iterdir()}
    assert _install(str(root), _writer("a.txt", calls=calls), name="x", size=[2, 3]) == root  # a tuple is a list
    assert len(calls) == 1 and {p: p.stat().st_mtime_ns for p in root.iterdir()} == stamps
    assert os.listdir(root.parent) == ["toy"]


def test_other_params_or_version_replace_the_set(tmp_path):
    root, calls = tmp_path / "toy", []
    _install(root, _writer("old.txt", calls=calls), seed=0)
    _install(root, _writer("new.txt", calls=calls), seed=1)
    assert sorted(os.listdir(root)) == [MARKER, "new.txt"] and read_marker(root)["params"] == {"seed": 1}
    _install(root, _writer("newer.txt", calls=calls), version=2, seed=1)
    assert sorted(os.listdir(root)) == [MARKER, "newer.txt"] and read_marker(root)["version"] == 2
    assert len(calls) == 3 and os.listdir(tmp_path) == ["toy"]  # the old sets were moved aside and deleted


def test_overwrite_rewrites_a_current_set(tmp_path):
    root, calls = tmp_path / "toy", []
    _install(root, _writer("a.txt", calls=calls), seed=0)
    (root / "a.txt").write_text("damaged")
    install_generated(root, generator="toy", version=1, params={"seed": 0}, write=_writer("a.txt", calls=calls),
                      overwrite=True)
    assert len(calls) == 2 and (root / "a.txt").read_text() == f"a.txt in {calls[1].name}"
    assert os.listdir(tmp_path) == ["toy"]


def test_an_empty_folder_is_filled(tmp_path):
    root = tmp_path / "toy"
    root.mkdir()
    _install(root, _writer("a.txt"), seed=0)
    assert sorted(os.listdir(root)) == ["a.txt", MARKER]


@pytest.mark.parametrize("content", ["user files", "another generator", "unreadable marker", "a file"])
def test_a_foreign_root_is_refused_and_left_untouched(tmp_path, content):
    root, calls = tmp_path / "data", []
    if content == "a file":
        root.write_text("precious")
    else:
        root.mkdir()
        (root / "precious.txt").write_text("precious")
        if content == "another generator":
            (root / MARKER).write_text(json.dumps({"generator": "other", "version": 1, "params": {"seed": 0}}))
        elif content == "unreadable marker":
            (root / MARKER).write_text("{not json")
    before = root.read_bytes() if root.is_file() else _tree(root)
    with pytest.raises(ValueError, match=re.escape(f"'{root}' exists and is not a 'toy' set")):
        _install(root, _writer("a.txt", calls=calls), seed=0)
    with pytest.raises(ValueError):
        install_generated(root, generator="toy", version=1, params={"seed": 0}, write=_writer("a.txt"),
                          overwrite=True)
    assert calls == [] and (root.read_bytes() if root.is_file() else _tree(root)) == before
    assert os.listdir(tmp_path) == ["data"]


@pytest.mark.parametrize("existing", [False, True])
def test_a_failing_write_leaves_no_staging_and_no_new_set(tmp_path, existing):
    root = tmp_path / "toy"
    if existing:
        _install(root, _writer("old.txt"), seed=0)
    before = _tree(root) if existing else None

    def write(folder: Path) -> None:
        (folder / "half.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        _install(root, write, seed=1)
    assert os.listdir(tmp_path) == (["toy"] if existing else [])
    assert (_tree(root) if existing else None) == before  # the previous set, marker included, is intact


def test_a_set_installed_by_another_writer_meanwhile_is_kept(tmp_path):
    # Another writer installs the same set while ours is being written: our rename fails, and theirs is used.
    root = tmp_path / "toy"

    def write(folder: Path) -> None:
        _install(root, _writer("theirs.txt"), seed=0)
        (folder / "ours.txt").write_text("ours")

    _install(root, write, seed=0)
    assert sorted(os.listdir(root)) == [MARKER, "theirs.txt"] and os.listdir(tmp_path) == ["toy"]


def test_an_outdated_set_installed_meanwhile_is_replaced(tmp_path):
    # Another writer installs an older version while ours is being written: it is moved aside, ours installed.
    root = tmp_path / "toy"

    def write(folder: Path) -> None:
        _install(root, _writer("theirs.txt"), version=0, seed=0)
        (folder / "ours.txt").write_text("ours")

    _install(root, write, seed=0)
    assert sorted(os.listdir(root)) == [MARKER, "ours.txt"] and read_marker(root)["version"] == 1
    assert os.listdir(tmp_path) == ["toy"]  # no .partial or .old folder left


# -- two processes at once --------------------------------------------------------------------------------------------

# Every writer process signals that it is ready, then waits for the go file, so that both start at the same moment.
_START = """
import sys, time
from pathlib import Path
go, log, root, tag = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
(log / f"ready-{tag}").touch()
while not go.exists():
    time.sleep(0.005)
"""

_INSTALL = _START + """
from datamodules.generated.install import install_generated

def write(folder):
    (log / f"writing-{tag}").touch()
    for i in range(20):
        (folder / f"{i:02d}.txt").write_text(f"{i} by {tag}")
    time.sleep(1.0)  # both writers are certainly writing at once
    (folder / "writer.txt").write_text(tag)

install_generated(root, generator="toy", version=1, params={"files": 20}, write=write)
"""

_TOY_BIRDS = _START + """
import datamodules.generated.finegrained_toybirds as birds

draw = birds._draw_bird

def slow_draw(*args):
    writing = log / f"writing-{tag}"
    if not writing.exists():  # hold the first bird, so that both writers are certainly writing at once
        writing.touch()
        time.sleep(0.5)
    return draw(*args)

birds._draw_bird = slow_draw
birds.write_toy_birds(root, train_per_class=2, test_per_class=1, seed=1)
"""


def _run_two_writers(script: str, root: Path, log: Path) -> None:
    """Run ``script`` in two processes that start together on ``root``; assert that both succeed and both wrote."""
    log.mkdir()
    go = log / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    processes = [subprocess.Popen([sys.executable, "-c", script, str(go), str(log), str(root), tag], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for tag in ("a", "b")]
    try:
        deadline = time.monotonic() + 60
        while not all((log / f"ready-{tag}").exists() for tag in "ab"):
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "a writer did not start"
            time.sleep(0.01)
        go.touch()
        results = [p.communicate(timeout=60) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (_, stderr) in zip(processes, results):
        assert p.returncode == 0, stderr[-3000:]
    # Both found no current set and wrote one: the installs really raced.
    assert (log / "writing-a").exists() and (log / "writing-b").exists()


@pytest.mark.parametrize("start", ["no set", "an outdated set"])
def test_two_processes_installing_at_once_leave_one_complete_set(tmp_path, start):
    root = tmp_path / "sets" / "toy"
    if start == "an outdated set":
        install_generated(root, generator="toy", version=1, params={"files": 3}, write=_writer("stale.txt"))
    _run_two_writers(_INSTALL, root, tmp_path / "log")
    assert read_marker(root) == {"generator": "toy", "version": 1, "params": {"files": 20}}
    winner = (root / "writer.txt").read_text()
    assert winner in ("a", "b")
    assert sorted(os.listdir(root)) == sorted([*(f"{i:02d}.txt" for i in range(20)), "writer.txt", MARKER])
    assert all((root / f"{i:02d}.txt").read_text() == f"{i} by {winner}" for i in range(20))  # one writer's files
    assert os.listdir(root.parent) == ["toy"]  # no .partial or .old folder left


def test_two_processes_writing_toy_birds_at_once_give_the_single_writer_files(tmp_path):
    from datamodules.generated.finegrained_toybirds import write_toy_birds

    _run_two_writers(_TOY_BIRDS, tmp_path / "shared" / "birds", tmp_path / "log")
    reference = write_toy_birds(tmp_path / "alone" / "birds", train_per_class=2, test_per_class=1, seed=1).parent
    shared = _tree(tmp_path / "shared" / "birds")
    assert len(shared) == 12 * 3 + 5 + 1 and shared == _tree(reference)  # images, tables, marker
    assert os.listdir(tmp_path / "shared") == ["birds"]
