"""Where runs live, and how a config is found by name.

Every ``zoo fit`` gets its own folder, ``<root>/version_<N>/``, under the run root ``trainer.default_root_dir``
(default ``runs/<config name>``)::

    runs/digits/
        version_0/  config.yaml  checkpoints/{last.ckpt, best-...ckpt}  wandb/  tables/  predictions/
        version_1/  ...
        latest -> version_1        (the newest fit's folder)

A run resumed with ``--ckpt_path`` continues in the folder of its checkpoint, and ``--ckpt_path last`` means the
newest run's ``last.ckpt`` (``last_checkpoint``). ``test``/``validate``/``predict`` work in the folder of the checkpoint
they load and write their own ``<command>_config.yaml`` there, so a run's ``config.yaml`` is always the one it was
trained with.

Under DDP every process must agree on the folder: processes that Lightning launches inherit it from rank 0 through
the ``ZOO_RUN_DIR`` environment variable; processes launched by ``torchrun`` or SLURM, which all parse the command
line at once, use ``job_<id>`` from ``TORCHELASTIC_RUN_ID`` / ``SLURM_JOB_ID`` instead of a counter.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Optional

__all__ = [
    "RUNS_ROOT", "config_dirs", "all_configs", "find_config", "run_root_of_config", "versions", "next_version",
    "latest_run", "last_checkpoint", "run_of_checkpoint", "choose_run_dir", "mark_latest",
]

#: the folder that holds one run root per config
RUNS_ROOT = Path("runs")
#: a run folder's name
_VERSION = re.compile(r"^(?:version_(\d+)|job_.+)$")
#: environment variable through which rank 0 hands its run folder to the processes it launches
RUN_DIR_ENV = "ZOO_RUN_DIR"


def config_dirs() -> list[Path]:
    """The ``configs/`` folders searched for a config given by name: the working directory's, then the repository's
    (the one next to the installed ``zoo`` package, for an editable install)."""
    candidates = [Path.cwd() / "configs", Path(__file__).resolve().parents[1] / "configs"]
    found: list[Path] = []
    for folder in candidates:
        if folder.is_dir() and all(folder.resolve() != f.resolve() for f in found):
            found.append(folder)
    return found


def all_configs() -> list[Path]:
    """Every ``configs/<family>/<name>.yaml`` of the first ``configs/`` folder found, sorted by family and name."""
    folders = config_dirs()
    return sorted(folders[0].glob("*/*.yaml")) if folders else []


def find_config(name: str) -> Path:
    """A config given as a path (returned as is when it exists) or by name: ``gfl_digits``, ``gfl_digits.yaml`` or
    ``detection/gfl_digits``, looked up in ``config_dirs()``. Raises ``FileNotFoundError`` listing close names."""
    path = Path(name)
    if path.is_file():
        return path
    stem = name[:-5] if name.endswith((".yaml", ".yml")) else name
    known = [p for folder in config_dirs() for p in sorted(folder.glob("*/*.y*ml"))]
    matches = [p for p in known if p.stem == stem or f"{p.parent.name}/{p.stem}" == stem]
    if len(matches) >= 1 and all(m.resolve() == matches[0].resolve() or m.name == matches[0].name for m in matches):
        return matches[0]
    if len(matches) > 1:
        raise FileNotFoundError(f"config '{name}' is ambiguous: " + ", ".join(str(m) for m in matches))
    close = difflib.get_close_matches(stem, sorted({p.stem for p in known}), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `zoo list` shows every config"
    raise FileNotFoundError(f"config '{name}' is neither a file nor a config name under "
                            f"{', '.join(str(f) for f in config_dirs()) or 'configs/'}{hint}")


def run_root_of_config(config_paths: list) -> Path:
    """``runs/<name of the last config file>`` (``runs/zoo`` without one)."""
    return RUNS_ROOT / (Path(str(config_paths[-1])).stem if config_paths else "zoo")


def _version_key(folder: Path) -> tuple[int, float]:
    """``version_<N>`` folders by ``N``; ``job_*`` folders after them, by time."""
    match = _VERSION.match(folder.name)
    if match and match.group(1) is not None:
        return 0, float(match.group(1))
    return 1, folder.stat().st_mtime


def versions(root: str | Path) -> list[Path]:
    """The run folders under ``root``, oldest first (by version number; ``job_*`` folders by time)."""
    root = Path(root)
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and _VERSION.match(p.name)]
    return sorted(folders, key=_version_key)


def next_version(root: str | Path) -> Path:
    """``root/version_<N>`` with ``N`` one past the highest existing number (not created)."""
    numbers = [int(key[1]) for key in map(_version_key, versions(root)) if key[0] == 0]
    return Path(root) / f"version_{max(numbers, default=-1) + 1}"


def latest_run(root: str | Path) -> Optional[Path]:
    """The newest run folder under ``root`` that holds ``checkpoints/last.ckpt``; ``root`` itself for a run made
    before run folders had versions; else ``None``."""
    for folder in reversed(versions(root)):
        if (folder / "checkpoints" / "last.ckpt").is_file():
            return folder
    return Path(root) if (Path(root) / "checkpoints" / "last.ckpt").is_file() else None


def last_checkpoint(config: str | Path, root: Optional[str | Path] = None) -> Optional[Path]:
    """The newest run's ``last.ckpt`` of a config (a name like ``"digits"`` or a path), or ``None`` if it has none.

    ``root``: the run root, when it is not the default ``runs/<config name>`` (``--trainer.default_root_dir``)."""
    run = latest_run(root if root is not None else RUNS_ROOT / Path(str(config)).stem)
    return run / "checkpoints" / "last.ckpt" if run is not None else None


def run_of_checkpoint(ckpt_path: str | Path) -> Optional[Path]:
    """The run folder a checkpoint was written in (``<run>/checkpoints/<file>``), or ``None``."""
    path = Path(ckpt_path)
    return path.parent.parent if path.parent.name == "checkpoints" else None


def choose_run_dir(root: str | Path, create: bool = True) -> Path:
    """A new run folder under ``root`` for a fit that starts fresh, agreed on by every process of a DDP job (see the
    module docstring); created unless ``create`` is false (``--print_config``)."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
        return Path(inherited)
    job = os.environ.get("TORCHELASTIC_RUN_ID") or (
        os.environ.get("SLURM_JOB_ID") if int(os.environ.get("SLURM_NTASKS", "1")) > 1 else None)
    if job and job != "none" and int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1:
        folder = Path(root) / f"job_{job}"
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        return folder
    while True:
        folder = next_version(root)
        if not create:
            return folder
        try:
            folder.mkdir(parents=True, exist_ok=False)
            return folder
        except FileExistsError:  # another run of the same config took this number first
            continue


def mark_latest(run_dir: Path) -> None:
    """Point ``<root>/latest`` at ``run_dir`` (a relative symlink; skipped where links cannot be made)."""
    link = run_dir.parent / "latest"
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(run_dir.name, target_is_directory=True)
    except OSError:
        pass
