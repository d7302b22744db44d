"""Checkpoint files: written atomically, read as data only.

:func:`save_checkpoint` writes to a temporary file in the target folder, flushes and
fsyncs it, renames it over the target with ``os.replace`` and fsyncs the folder, so a
crash at any moment leaves either the old file or the new one, never half of one.
:func:`load_checkpoint` uses ``torch.load(weights_only=True)``: a checkpoint is
tensors and plain types, and a pickle that would run code is refused.

State-dict keys are stored without ``torch.compile``'s ``_orig_mod.`` and DDP's
``module.`` prefixes (:func:`clean_state_dict`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lmkit.errors import CheckpointError, first_line

_PREFIXES = ("_orig_mod.", "module.")


def clean_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Strip ``_orig_mod.`` / ``module.`` prefixes (in any order, repeated) from keys."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: Path) -> int:
    """Write ``state`` to ``path`` atomically; return the file size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        size = tmp.stat().st_size
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return size


def link_checkpoint(source: Path, target: Path) -> None:
    """Make ``target`` hold the same bytes as ``source`` atomically: a hard link (no
    copy) where the file system allows, a copy otherwise. Replacing ``source`` later
    leaves ``target`` unchanged."""
    import shutil

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint as data (``weights_only=True``).

    Raises:
        CheckpointError: missing, truncated, not a torch file, or holding objects that
            would need code to unpickle -- naming the file.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(f"{path}: not a readable lmkit checkpoint ({first_line(exc, 160)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not an lmkit checkpoint (no model weights)")
    return state
