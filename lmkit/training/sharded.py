"""Sharded checkpoints (FSDP2) with PyTorch's Distributed Checkpoint, crash-safe and read as data.

A sharded checkpoint is a folder ``checkpoints/TAG.dcp/`` holding what
:func:`torch.distributed.checkpoint.save` writes (``.metadata`` and one ``__R_I.distcp``
file per rank) for ``{"model": ..., "optimizer": ...}`` as returned by
:func:`torch.distributed.checkpoint.state_dict.get_state_dict` (keys are the unwrapped
model's FQNs), plus two files of lmkit's:

* ``extra.pt``: the rest of the training state (step, config, every rank's RNG states,
  data position, scheduler ...), plain values and small tensors, read with
  ``torch.load(weights_only=True)``;
* ``lmkit_manifest.json``: ``kind``/``format``, ``step``, ``world_size``, whether the
  optimizer is in it, and every file of the folder with its size in bytes and CRC-32, the
  whole under a CRC-32 of its own (``checksum``).

Crash rule (as for single files, :mod:`lmkit.training.checkpoint`): the folder is written
under a temporary name ``.TAG.dcp.<token>.tmp`` (the token chosen by rank 0), every file
is fsynced, rank 0 writes the manifest last and only then puts the folder in place -- a
``rename`` when the tag is new, an atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``)
when it replaces an older folder, and where that is unavailable a rename of the old one
to ``.TAG.dcp.<token>.old`` first, which
:func:`~lmkit.training.checkpoint.remove_stale_temp_files` puts back if the crash came
between the two renames. A torn save is therefore never under a tag name.

Verification at load (every file's size and CRC-32, agreed across ranks) and safety (DCP's
``.metadata`` pickle read by a restricted unpickler, non-tensor values with
``weights_only=True``): :mod:`lmkit.training.sharded_files`. Source: PyTorch's Distributed
Checkpoint documentation (``torch.distributed.checkpoint``, ``state_dict``).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmkit.errors import CheckpointError, first_line
from lmkit.training import checkpoint as _ckpt
from lmkit.training.sharded_files import (
    EXTRA,
    FORMAT,
    KIND,
    MANIFEST,
    SUFFIX,
    _manifest_checksum,
    _planner,
    _reader,
    file_crc32,
    is_sharded,
    load_extra,
    peek_manifest_step,
    read_manifest,
    read_metadata,
    verify_sharded,
)

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from lmkit.training.distributed import Distributed

# --------------------------------------------------------------------------------------
# Putting a folder in place, linking, removing
# --------------------------------------------------------------------------------------

_USE_EXCHANGE = True  # tests switch it off to exercise the two-rename fallback
#: Temporary folders of this module: ``.TAG.dcp.<8 hex>.tmp`` (a save or link under way, or
#: the old folder after an exchange) and ``.TAG.dcp.<8 hex>.old`` (displaced by the fallback).
TMP_DIR_PATTERN = re.compile(r"^\.(.+\.dcp)\.[0-9a-f]{8}\.tmp$")
OLD_DIR_PATTERN = re.compile(r"^\.(.+\.dcp)\.[0-9a-f]{8}\.old$")


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    if not _USE_EXCHANGE:
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not supported here
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _put_in_place(tmp: Path, path: Path, token: str, plan: dict[str, str] | None) -> None:
    """Make complete folder ``tmp`` appear as ``path`` in one step, replacing an older ``path``."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
    elif _exchange(tmp, path):  # tmp now holds the old folder
        _ckpt._maybe_die(plan, "after_exchange")
        _remove_tree(tmp)
    else:
        old = path.parent / f".{path.name}.{token}.old"
        os.rename(path, old)
        _ckpt._maybe_die(plan, "between_renames")  # remove_stale_temp_files puts `old` back
        os.rename(tmp, path)
        _remove_tree(old)
    _ckpt._fsync_dir(path.parent)


def restore_or_remove_old(entry: Path) -> Path | None:
    """A ``.TAG.<token>.old`` folder left by a crash between the two renames of
    :func:`_put_in_place`: renamed back to ``TAG`` when ``TAG`` is missing (the new one never
    arrived), else removed. Returns what was removed (None when restored)."""
    match = OLD_DIR_PATTERN.match(entry.name)
    if match is None:
        raise ValueError(f"{entry}: not a displaced checkpoint folder")
    target = entry.parent / match.group(1)
    if not os.path.lexists(target):
        os.rename(entry, target)
        _ckpt._fsync_dir(entry.parent)
        return None
    _remove_tree(entry)
    return entry


def link_folder(source: Path, target: Path) -> None:
    """Make folder ``target`` hold the files of ``source`` (hard links where the file system
    allows, durable copies otherwise), atomically replacing an older ``target``. Files of a
    checkpoint folder are never modified in place, so the two stay independent: removing or
    replacing ``source`` later leaves ``target`` whole."""
    if source.suffix != target.suffix:
        raise ValueError(f"link {source.name} -> {target.name}: a folder is linked under a name of the same kind")
    plan = _ckpt._crash_plan()
    token = secrets.token_hex(4)
    tmp = target.parent / f".{target.name}.{token}.tmp"
    tmp.mkdir()
    try:
        for file in sorted(source.iterdir()):
            if not file.is_file():
                raise CheckpointError(f"{file}: a checkpoint folder holds only files")
            try:
                os.link(file, tmp / file.name)
            except OSError:
                shutil.copyfile(file, tmp / file.name)
                with (tmp / file.name).open("rb+") as f:
                    os.fsync(f.fileno())
        _ckpt._fsync_dir(tmp)
        _ckpt._maybe_die(plan, "after_link")
        _put_in_place(tmp, target, token, plan)
    except BaseException:
        _remove_tree(tmp)
        raise


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint file or folder; a folder first disappears from its tag name in one
    rename, so a crash mid-delete leaves only a temporary folder (removed at the next resume)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        os.rename(path, tmp)
        _remove_tree(tmp)
    else:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------


@contextmanager
def _quiet():
    """DCP warns on every single-process save/load ("torch.distributed is disabled ..."); that
    is the intended use here, so only that warning is silenced, and only around the call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)
        yield


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def _inner(exc: BaseException) -> BaseException:
    """The exception a rank raised inside DCP (a ``CheckpointException`` -- a ``BaseException``
    -- wraps each rank's as ``(exception, traceback)``), or ``exc`` itself."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        return inner[0] if isinstance(inner, tuple) else inner
    return exc


def _dcp_error(exc: BaseException, path: Path, what: str) -> CheckpointError:
    """One line for a failure inside DCP; an lmkit error raised inside it keeps its message."""
    inner = _inner(exc)
    if isinstance(inner, CheckpointError):
        return CheckpointError(str(inner))
    return CheckpointError(f"{path}: {what} ({first_line(inner, 160)})")


def _write_durable(file: Path, write: Any) -> dict[str, Any]:
    """Write ``file`` with ``write(f)``, fsync it, and return its manifest entry."""
    with file.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": file.stat().st_size, "crc32": file_crc32(file)}


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, extra: dict[str, Any], path: Path,
                 dist: Distributed | None) -> int:
    """Write a sharded checkpoint folder ``path`` (``checkpoints/TAG.dcp``); a collective: every
    rank calls it. Returns the bytes written (all ranks' files together, the same on every rank).

    Args:
        model: the FSDP2-wrapped (``fully_shard``) or plain model; its state is taken with
            ``get_state_dict`` (FQNs of the unwrapped model).
        optimizer: its optimizer, or None (weights only).
        extra: the rest of the state (``step`` at least; plain values and small tensors),
            written by rank 0: pass the values every rank agrees on, and gathered ones (e.g.
            every rank's RNG states) as lists.
        dist: this process's :class:`~lmkit.training.distributed.Distributed` (a
            stand-in with ``world_size == 1``, or None, in a single process).

    Raises:
        CheckpointError: the write failed on some rank (every rank raises; the folder under
            ``path`` is unchanged).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.api import CheckpointException

    path = Path(path)
    if not is_sharded(path):
        raise ValueError(f"{path}: a sharded checkpoint's name ends in {SUFFIX}")
    if dist is None:
        from lmkit.training.distributed import Distributed

        dist = Distributed()
    _ckpt._saves_in_process += 1
    plan = _ckpt._crash_plan()
    started = bool(getattr(dist, "started", False))
    token = dist.broadcast_object(secrets.token_hex(4) if dist.is_main else None)
    tmp = path.parent / f".{path.name}.{token}.tmp"
    _ckpt._maybe_die(plan, "before_write")
    try:
        with _quiet():
            dcp.save(_state_dicts(model, optimizer), storage_writer=FileSystemWriter(tmp, sync_files=True),
                     process_group=dist.cpu_group if started else None, no_dist=not started)
        own = {}
        prefix = f"__{dist.rank if started else 0}_"
        for file in sorted(tmp.iterdir()):
            if file.name.startswith(prefix) and file.name.endswith(".distcp"):
                own[file.name] = {"bytes": file.stat().st_size, "crc32": file_crc32(file)}
        error = None
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - reported on every rank below
        own, error = {}, first_line(_inner(exc), 160)
    _ckpt._maybe_die(plan, "after_shards")
    gathered = dist.all_gather_object((own, error))
    errors = [e for _, e in gathered if e]
    outcome: tuple[str, Any] = ("error", f"{path}: the sharded save failed ({errors[0]})") if errors else ("ok", 0)
    if dist.is_main and not errors:
        try:
            files: dict[str, Any] = {}
            for part, _ in gathered:
                files.update(part)
            for file in sorted(tmp.iterdir()):  # .metadata, and anything no rank claimed
                if file.name not in files:
                    files[file.name] = {"bytes": file.stat().st_size, "crc32": file_crc32(file)}
            state = _ckpt.host_copy(dict(extra))
            files[EXTRA] = _write_durable(tmp / EXTRA, lambda f: torch.save(state, f))
            load_extra(tmp, {"step": state.get("step")})  # loadable as data, or the save fails now
            manifest = {"kind": KIND, "format": FORMAT, "step": state.get("step"), "world_size": dist.world_size,
                        "optimizer": optimizer is not None, "torch_version": str(torch.__version__),
                        "files": files}
            manifest["checksum"] = _manifest_checksum(manifest)
            _write_durable(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
            _ckpt._fsync_dir(tmp)
            _ckpt._maybe_die(plan, "after_manifest")
            _put_in_place(tmp, path, token, plan)
            _ckpt._maybe_die(plan, "after_replace")
            outcome = ("ok", sum(entry["bytes"] for entry in files.values()) + (path / MANIFEST).stat().st_size)
        except BaseException as exc:  # the others must not wait for a folder that never comes
            outcome = ("error", f"{path}: the sharded save failed ({first_line(exc, 160)})")
            dist.broadcast_object(outcome)
            _remove_tree(tmp)
            if isinstance(exc, Exception):
                raise CheckpointError(outcome[1]) from exc
            raise
    if errors and dist.is_main:
        _remove_tree(tmp)
    kind, value = dist.broadcast_object(outcome)
    if kind != "ok":
        raise CheckpointError(value)
    return int(value)


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 dist: Distributed | None = None, *, crc: bool = True) -> dict[str, Any]:
    """Load sharded checkpoint ``path`` in place into ``model`` (FSDP2-wrapped or plain) and
    ``optimizer`` (None: weights only), resharded by DCP to the current world size; return its
    ``extra`` (with ``manifest``). A collective on several ranks; works in a single process with
    no process group (``dist`` None or a one-process stand-in), e.g. a 2-rank run resumed as 1.
    Every file's size is checked; ``crc=False`` skips the CRC-32 pass, for a folder this
    process has just verified (:func:`~lmkit.training.checkpoint.newest_complete`).

    Raises:
        CheckpointError: the folder does not verify, would run code, holds no optimizer state
            when one is asked for, or does not fit the model/optimizer -- one line, on every rank.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    started = bool(dist is not None and getattr(dist, "started", False))
    manifest = verify_sharded(path, dist if started else None, crc=crc)
    extra = load_extra(path, manifest)
    read_metadata(path, manifest)  # refused here, before DCP reads it
    if optimizer is not None and not manifest.get("optimizer"):
        raise CheckpointError(f"{path}: holds no optimizer state (saved with weights only)")
    state = _state_dicts(model, optimizer)
    try:
        with _quiet():
            dcp.load(state, storage_reader=_reader(path, manifest), planner=_planner(path),
                     process_group=dist.cpu_group if started else None, no_dist=not started)
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP raises many types
        raise _dcp_error(exc, path, "does not fit this model or optimizer") from None
    return extra


def load_consolidated(path: Path, optimizer: bool = False) -> dict[str, Any]:
    """Sharded checkpoint ``path`` as one state, in this process (no process group used):
    ``model`` a full state dict keyed like the unwrapped model's (the dtype it was trained in,
    fp32 master weights under FSDP), the ``extra`` fields and ``manifest``; with
    ``optimizer``, also ``optimizer`` in ``get_state_dict``'s FQN-keyed form. Every file is
    verified first. Host memory holds the whole model.

    Raises:
        CheckpointError: as :func:`load_sharded`.
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # as dcp_to_torch_save

    path = Path(path)
    manifest = verify_sharded(path)
    state = load_extra(path, manifest)
    read_metadata(path, manifest)
    keys = {"model", "optimizer"} if optimizer and manifest.get("optimizer") else {"model"}
    loaded: dict[str, Any] = {}
    try:
        with _quiet():
            _load_state_dict(loaded, storage_reader=_reader(path, manifest),
                             planner=_planner(path, empty=True, keys=keys), no_dist=True)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP raises many types
        raise _dcp_error(exc, path, "cannot be loaded") from None
    if "model" not in loaded:
        raise CheckpointError(f"{path}: not an lmkit checkpoint (no model weights)")
    state["model"] = _ckpt.clean_state_dict(loaded["model"])
    if "optimizer" in loaded:
        state["optimizer"] = loaded["optimizer"]
    return state


__all__ = ["FORMAT", "KIND", "MANIFEST", "SUFFIX", "file_crc32", "is_sharded", "link_folder", "load_consolidated",
           "load_extra", "load_sharded", "peek_manifest_step", "read_manifest", "read_metadata",
           "remove_checkpoint", "restore_or_remove_old", "save_sharded", "verify_sharded"]
