"""``zoo list [family]``: every config under ``configs/`` with its model, its data and its measured result.

The result is the config's ``# measured:`` header line (the figure its model doc records, with seeds and budget
there), so a config and its number travel together; a config without one says so.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import yaml

from zoo.runs import all_configs

__all__ = ["ConfigEntry", "catalog", "print_catalog"]


class ConfigEntry:
    """One config: its family folder, name, model and data class names and its ``# measured:`` line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.family, self.name = path.parent.name, path.stem
        text = path.read_text()
        config = yaml.safe_load(text) or {}
        self.model = _class_name(config.get("model"))
        self.data = _class_name(config.get("data"))
        self.measured = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                              if line.startswith("# measured:")), "")


def _class_name(section: object) -> str:
    if isinstance(section, dict) and section.get("class_path"):
        return str(section["class_path"]).rsplit(".", 1)[-1]
    return "?"


def catalog(family: Optional[str] = None) -> list[ConfigEntry]:
    """The configs of ``family`` (all when ``None``), sorted by family and name."""
    return [ConfigEntry(p) for p in all_configs() if family is None or p.parent.name == family]


def print_catalog(args: list[str]) -> int:
    """Print the table of ``zoo list [family]``; returns the exit status (2 for an unknown family)."""
    family = args[0] if args else None
    entries = catalog(family)
    if not entries:
        families = sorted({p.parent.name for p in all_configs()})
        print(f"zoo: error: no configs for family {family!r}; families: {', '.join(families)}", file=sys.stderr)
        return 2
    widths = [max(len(getattr(e, f)) for e in entries) for f in ("family", "name", "model", "data")]
    header = ("family", "config", "model", "data", "measured (embedded default; see docs/models/)")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    print("  ".join(h.ljust(w) for h, w in zip(header[:4], widths)) + "  " + header[4])
    for e in entries:
        cells = (e.family, e.name, e.model, e.data)
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + (e.measured or "—"))
    print(f"\n{len(entries)} configs. Run one with `zoo fit -c <config>` (name or path).")
    return 0
