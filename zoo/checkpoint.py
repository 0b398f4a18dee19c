"""Loading weights for fine-tuning, and checkpoint writes that a crash cannot tear.

``load_weights`` reads a Lightning checkpoint or a plain ``state_dict`` file with ``weights_only=True``, maps key
prefixes (timm's ``checkpoint_filter_fn`` idea, as data instead of code) and copies every tensor whose name and shape
match, reporting the rest instead of failing on them, so a new head with another class count is simply skipped.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

__all__ = ["LoadReport", "read_state_dict", "remap_keys", "load_weights", "AtomicCheckpointIO",
           "remove_stale_temporaries", "drop_module_hyperparameters"]


def drop_module_hyperparameters(model: nn.Module) -> None:
    """Leave out of ``model.hparams`` every network that was passed as an object; call it after
    ``save_hyperparameters()``.

    Through the CLI a network argument (a backbone, an FPN neck) is recorded as its config (``class_path`` +
    ``init_args``), so ``Model.load_from_checkpoint(path)`` rebuilds it with no argument. A network built in Python and
    passed as an object would be pickled into every checkpoint instead, which ``weights_only=True`` loading (resume,
    ``load_weights``) refuses; such a model is loaded with ``Model.load_from_checkpoint(path, backbone=...)``.
    """
    for store in (getattr(model, "_hparams", None), getattr(model, "_hparams_initial", None)):
        if store is not None:
            for key in [key for key, value in store.items() if isinstance(value, nn.Module)]:
                del store[key]


@dataclass
class LoadReport:
    """What ``load_weights`` did with each key."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    shape_mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.shape_mismatched:
            lines.append(f"skipped {len(self.shape_mismatched)} with another shape (kept the model's own init):")
            lines += [f"    {k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in self.shape_mismatched]
        if self.missing:
            lines.append(f"missing from the file ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected in the file ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        return "\n".join(lines)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from a Lightning ``.ckpt`` (its ``state_dict``) or from a plain weights file.

    Plain files may hold the tensors at the top level or under ``state_dict`` / ``model`` (torchvision and timm
    releases do both). Loading uses ``weights_only=True``: no code in the file is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no checkpoint or weights file at '{path}'")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise RuntimeError(f"init_from: cannot read '{path}' as a PyTorch weights file ({err})") from err
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, Mapping) else {}
    if not tensors:
        raise RuntimeError(f"init_from: '{path}' holds no tensors (expected a state_dict or a Lightning checkpoint)")
    return tensors


def remap_keys(state_dict: Mapping[str, torch.Tensor], key_map: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Rename keys by prefix: ``{"encoder.": "backbone."}`` turns ``encoder.conv1.weight`` into ``backbone.conv1.weight``.

    The longest matching prefix wins; a prefix mapped to ``""`` strips it. Keys matching no prefix keep their name.
    """
    prefixes = sorted(key_map, key=len, reverse=True)
    out = {}
    for key, value in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key_map[prefix] + key[len(prefix) :]
                break
        out[key] = value
    return out


def load_weights(
    model: nn.Module, path: str | os.PathLike, key_map: Mapping[str, str] | None = None
) -> LoadReport:
    """Copy every tensor of ``path`` whose (mapped) name and shape match ``model``; report all others."""
    source = remap_keys(read_state_dict(path), key_map or {})
    target = model.state_dict()
    report = LoadReport()
    to_load = {}
    for key, value in source.items():
        if key not in target:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(target[key].shape):
            report.shape_mismatched.append((key, tuple(value.shape), tuple(target[key].shape)))
        else:
            to_load[key] = value
            report.loaded.append(key)
    report.missing = [k for k in target if k not in source]
    model.load_state_dict(to_load, strict=False)
    return report


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def _temporary_prefix(path: Path) -> str:
    # The writer's host and process id are in the name, so that a later run can tell a file left by a killed writer
    # from one that a live process is still writing.
    return f".{path.name}.{_host()}-{os.getpid()}."


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that ``AtomicCheckpointIO`` left in ``folder`` when its process was killed mid-write
    (on this host, by a process that no longer exists); return their paths. Files of live writers and of other hosts
    are kept."""
    removed = []
    host = _host()
    for path in Path(folder).glob(".*.tmp"):
        match = _TEMPORARY.match(path.name)
        if match and match["host"] == host and not _pid_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place, with the permissions of a plain write.

    A run killed while saving (SIGKILL, OOM, pre-emption) leaves the previous ``last.ckpt`` whole instead of a
    truncated file that ``--ckpt_path last`` cannot read; the temporary file it leaves behind is removed by the next
    run (``remove_stale_temporaries``). Remote paths (``s3://``...) fall back to the plain write.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        fs = get_filesystem(path)
        if type(fs).__name__ != "LocalFileSystem":
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            # mkstemp creates the file 0600; a plain open() would have given 0666 less the umask.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
