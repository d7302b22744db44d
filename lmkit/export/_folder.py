"""Writing an export folder atomically: a temporary sibling folder renamed into place at the end.

A crash or Ctrl-C never leaves a half-written ``OUT``: the files are written into
``OUT/../.OUT.tmp-PID``, which becomes ``OUT`` by one ``rename`` once everything is written.
A non-empty ``OUT`` is only replaced with ``force``; the old folder is moved aside first
and removed only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from lmkit.errors import ConfigError, LmkitError

METADATA_FILE = "lmkit_export.json"
FAILED_MARKER = "EXPORT_FAILED"


class ExportError(LmkitError):
    """The export was written but failed verification (exit code 1); the folder is marked failed."""

    exit_code = 1


def check_out(out: Path, force: bool) -> None:
    """Refuse an ``OUT`` that cannot receive an export.

    Raises:
        ConfigError: ``OUT`` is a file, or a non-empty folder and ``force`` is false.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: is a file; give a folder for the export")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out}: folder exists and is not empty; pass --force to replace it, or pick another OUT")


def temp_folder(out: Path) -> Path:
    """A fresh empty folder next to ``out`` (same file system, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    return tmp


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_modes(folder: Path) -> None:
    """Give every file under ``folder`` the mode a newly created file gets (``0o666`` less the
    umask; folders ``0o777`` less the umask): some writers (safetensors' ``save_file``, through
    a temporary file) leave ``0o600`` where the other files of the export are ``0o644``."""
    mask = current_umask()
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``, replacing what is there (file modes made
    ordinary first: :func:`ordinary_modes`)."""
    ordinary_modes(tmp)
    tmp.chmod(0o777 & ~current_umask())
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            out.rename(old)
        else:
            out.rmdir()
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def mark_failed(folder: Path, reason: str, metadata: dict[str, Any]) -> None:
    """Make ``folder`` unmistakably unusable: weight files renamed to ``*.failed`` (so
    ``from_pretrained`` cannot load it), an ``EXPORT_FAILED`` file with the reason, and
    ``lmkit_export.json`` with ``"status": "failed"``."""
    for weights in list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json")):
        weights.rename(weights.with_name(weights.name + ".failed"))
    (folder / FAILED_MARKER).write_text(
        f"This export FAILED verification and must not be used.\nreason: {reason}\n", encoding="utf-8")
    write_json(folder / METADATA_FILE, {**metadata, "status": "failed", "failure": reason})


def versions() -> dict[str, str | None]:
    """Versions of the packages an export depends on."""
    from importlib import metadata

    from lmkit import __version__

    out: dict[str, str | None] = {"lmkit": __version__}
    for name in ("torch", "transformers", "tokenizers", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def conclude(tmp: Path, out: Path, metadata: dict[str, Any], verification: dict[str, Any]) -> None:
    """Finish a verified export: record ``verification`` in the metadata, then publish ``tmp`` as
    ``out``, marked ``verified``, or marked failed when ``verification["passed"]`` is false.

    Raises:
        ExportError: verification failed (``out`` is written and marked failed; exit 1).
    """
    metadata["verification"] = verification
    if not verification["passed"]:
        reason = "; ".join(verification["problems"])
        mark_failed(tmp, reason, metadata)
        publish(tmp, out)
        raise ExportError(f"export FAILED verification: {reason}; {out} is marked failed (see {out}/{FAILED_MARKER})")
    metadata["status"] = "verified"
    write_json(tmp / METADATA_FILE, metadata)
    publish(tmp, out)
