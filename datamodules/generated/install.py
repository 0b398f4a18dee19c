"""Install a generated data set at ``root`` once per parameter set, safely under concurrent writers.

Every generator in this package writes its set through ``install_generated``. The protocol:

1. A set owns its folder ``root``. ``root/generated.json`` holds ``{"generator", "version", "params"}`` and is
   written last, so a set is complete exactly when its marker matches. A matching set is returned as it is.
2. A non-empty ``root`` without a marker of this generator (a marker of another one, or none) is refused with a
   ``ValueError``: user data is never deleted. A marker of this generator with another version or other parameters
   marks an outdated set, which is replaced.
3. The set is written into a staging folder with a unique name next to ``root`` (``.<name>.<random>.partial``), the
   marker last, and moved into place with one ``os.rename``, which (on POSIX) is atomic and succeeds when ``root`` is
   absent or an empty folder. Readers see the old set, no set, or the whole new set, never a half-written one.
4. If ``root`` exists by then and is current, another process installed the same set first: ours is discarded. If
   it is outdated, it is renamed aside (again atomically, to ``.<name>.<random>.old``) and the rename retried; the
   old copy is deleted afterwards. The staging folder is always removed, even when ``write`` fails.

A process killed in the middle can leave a ``.partial`` folder next to ``root``; it is never read, and is not
removed automatically because another process may be writing it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["MARKER", "install_generated", "read_marker"]

#: name of the marker file inside every installed set
MARKER = "generated.json"

# Each retry means another writer installed a set between our two renames; a few are plenty.
_MAX_ATTEMPTS = 10


def read_marker(root: str | Path) -> Optional[dict[str, Any]]:
    """The marker of the set at ``root``, or ``None`` when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(root) / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _is_current(root: Path, expected: dict[str, Any]) -> bool:
    """Whether ``root`` holds the set ``expected`` describes; ``False`` when it is absent, empty or outdated.

    Raises:
        ValueError: ``root`` is a file, or a non-empty folder without a marker of ``expected["generator"]``.
    """
    # List first: writers only ever swap whole folders, so a folder listed with a marker is a complete set, and one
    # listed without it (not empty) is not ours. Reading the marker and then the folder could mix two folders.
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        names = None  # a file: refused below
    if names == []:
        return False  # os.rename replaces an empty folder
    marker = None
    if names and MARKER in names:
        try:
            marker = json.loads((root / MARKER).read_text())
        except FileNotFoundError:
            return False  # another writer moved the folder away since the listing
        except (OSError, json.JSONDecodeError):
            pass  # unreadable: not a marker of ours
    if marker == expected:
        return True
    if isinstance(marker, dict) and marker.get("generator") == expected["generator"]:
        return False  # an outdated set of this generator
    raise ValueError(f"'{root}' exists and is not a {expected['generator']!r} set (no matching {MARKER}); "
                     "refusing to replace it: delete it or choose an empty or new root")


def install_generated(
    root: str | Path,
    *,
    generator: str,
    version: int,
    params: dict[str, Any],
    write: Callable[[Path], None],
    overwrite: bool = False,
) -> Path:
    """Install the set that ``write`` produces at ``root``, unless it is already there; return ``root``.

    Args:
        root: the set's own folder (created if needed; an existing one must be empty or hold a set of ``generator``).
        generator: names the generator in the marker; sets of other generators are never replaced.
        version: bump it whenever the generator's output changes for the same ``params``.
        params: everything the files depend on; must survive a JSON round trip.
        write: writes the set's files into the (empty, existing) folder it is given.
        overwrite: rewrite the set even when ``root`` already holds this very one.

    Raises:
        ValueError: ``root`` holds something that is not a set of ``generator``.
        RuntimeError: other writers kept replacing ``root`` (more than a few times in a row).
    """
    root = Path(root)
    # through JSON once, so that e.g. tuples compare equal to the lists the marker reads back
    expected = json.loads(json.dumps({"generator": generator, "version": version, "params": params}))
    if _is_current(root, expected) and not overwrite:
        return root

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".partial", dir=root.parent))
    asides: list[Path] = []
    try:
        write(staging)
        (staging / MARKER).write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
        for attempt in range(_MAX_ATTEMPTS):
            try:
                os.rename(staging, root)
                return root
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            # The first time round, the set that ``overwrite`` asked to replace is still there.
            if _is_current(root, expected) and not (overwrite and attempt == 0):
                return root  # another process installed the same set first: use theirs
            aside = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
            asides.append(aside)
            try:
                os.rename(root, aside)  # replaces the empty placeholder folder ``aside``
            except FileNotFoundError:
                pass  # another process moved it first
        raise RuntimeError(f"could not install the {generator!r} set at '{root}': other writers kept replacing it")
    finally:
        for folder in (staging, *asides):
            shutil.rmtree(folder, ignore_errors=True)
