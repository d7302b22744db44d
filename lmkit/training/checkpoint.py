"""Checkpoint files: written atomically, verified at load, read as data only.

Writing (:func:`save_checkpoint`): the state goes to a temporary file in the target
folder, which is flushed and fsynced, renamed over the target with ``os.replace``, and
the folder is fsynced. A crash at any moment leaves the old file or the new one, never
half of one; the temporary file of an interrupted save is removed by the next resume.

Integrity: every checkpoint carries a ``manifest`` with a CRC-32 over everything in it --
the bytes of every tensor and a canonical text of every other value (step counters,
RNG lists, optimizer hyper-parameters, config) -- in a fixed order. :func:`load_checkpoint`
refuses a file that does not load (truncated: the zip directory at its end is missing)
or whose contents do not match the manifest (bit rot, a partial overwrite).

Cost of a save: the state is brought to host memory once (:func:`host_copy`: one copy of
each distinct device storage, none for tensors already on the CPU), and both the CRC and
``torch.save`` read that copy; the CRC runs in zlib (C) over each tensor's bytes in
place. Host memory holds the whole state during the save (for a GPU run, about the size
of the checkpoint file).

Safety: files are read with ``torch.load(weights_only=True)``. A checkpoint is tensors
and plain Python types; a pickle that would need code to load is refused, never run.

State-dict keys are stored without ``torch.compile``'s ``_orig_mod.`` and DDP's
``module.`` prefixes (:func:`clean_state_dict`).

Sharded checkpoints (FSDP2) are folders ``TAG.dcp/`` written with PyTorch's Distributed
Checkpoint under the same crash rule (:mod:`lmkit.training.sharded`); the functions here
find, verify, link, list and consolidate them too, so ``eval``/``export``/``svd-analyze``/
``--init-from`` read either kind.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import warnings
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmkit.errors import CheckpointError, first_line
from lmkit.training.crc import crc32_combine

FORMAT = 2
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
_PREFIXES = ("_orig_mod.", "module.")
TMP_PATTERN = re.compile(r"^\..+\.tmp$")


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


# --------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------


def _leaves(value: Any, path: str = ""):
    """Every leaf of a nested structure with a stable path, in a fixed order."""
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _leaves(value[key], f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        yield path, f"<{type(value).__name__}:{len(value)}>"
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}/{i}")
    else:
        yield path, value


def host_copy(value: Any, _memo: dict[tuple[str, int], torch.UntypedStorage] | None = None) -> Any:
    """``value`` (nested dicts, lists, tuples) with every tensor in host memory: a tensor
    already on the CPU is returned as is (no copy); each distinct device storage is copied
    to the host once, and every tensor on it becomes a view of that copy with the same
    offset, shape and strides (so tied weights stay one storage in the file, as
    ``torch.save`` writes them from the device)."""
    memo = {} if _memo is None else _memo
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu":
            return value
        storage = value.untyped_storage()
        key = (str(value.device), storage.data_ptr())
        if key not in memo:
            memo[key] = storage.cpu()
        out = torch.empty(0, dtype=value.dtype)
        out.set_(memo[key], value.storage_offset(), value.size(), value.stride())
        return out
    if isinstance(value, dict):
        items = [(k, host_copy(v, memo)) for k, v in value.items()]
        return type(value)(items) if isinstance(value, OrderedDict) else dict(items)
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(host_copy(v, memo) for v in value)
    return value


def tensor_checksum(state: dict[str, Any], threads: int | None = None) -> tuple[str, int]:
    """CRC-32 over every leaf of ``state`` (``manifest`` excluded) -- raw bytes for tensors,
    ``repr`` for plain values (exact for floats) -- and the number of tensors.

    The value is that of one ``zlib.crc32`` chained over, per leaf in :func:`_leaves`
    order, its path, then ``dtype`` + shape and the bytes (tensors) or the ``repr``
    (anything else). Tensor bytes are read in place (no copy for contiguous CPU tensors)
    in 16 MiB pieces, CRC'd on ``threads`` threads (default ``torch.get_num_threads()``;
    zlib releases the GIL) and joined with :func:`crc32_combine`, which gives the same
    value as the single chain.
    """
    pieces: list[tuple[str, Any]] = []  # ("text", bytes) or ("data", uint8 array)
    count = 0
    for path, leaf in _leaves({k: v for k, v in state.items() if k != "manifest"}):
        pieces.append(("text", path.encode()))
        if isinstance(leaf, torch.Tensor):
            data = leaf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            pieces.append(("text", f"{leaf.dtype}{tuple(leaf.shape)}".encode()))
            pieces.extend(("data", data[i:i + _CRC_PIECE]) for i in range(0, len(data), _CRC_PIECE))
            count += 1
        else:
            pieces.append(("text", repr(leaf).encode()))
    data_pieces = [piece for kind, piece in pieces if kind == "data"]
    workers = max(1, min(threads or torch.get_num_threads(), len(data_pieces)))
    if workers > 1 and sum(len(piece) for piece in data_pieces) >= 4 * _CRC_PIECE:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            crcs = iter(list(pool.map(zlib.crc32, data_pieces)))
    else:
        crcs = None
    crc = 0
    for kind, piece in pieces:
        if kind == "text" or crcs is None:
            crc = zlib.crc32(piece, crc)
        else:
            crc = crc32_combine(crc, next(crcs), len(piece))
    return f"{crc:08x}", count


_CRC_PIECE = 1 << 24  # bytes of a tensor CRC'd by one thread at a time
# --------------------------------------------------------------------------------------
# Test hook: die at a chosen moment of a chosen save (crash-matrix tests only)
# --------------------------------------------------------------------------------------

_saves_in_process = 0


def _crash_plan() -> dict[str, str] | None:
    """``LMKIT_TEST_CRASH="save=N,at=PHASE"`` or ``"save=N,bytes=B"``: SIGKILL this process
    during its N-th checkpoint write. Used only by the crash-matrix tests."""
    spec = os.environ.get("LMKIT_TEST_CRASH")
    if not spec:
        return None
    plan = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    return plan if int(plan.get("save", "0")) == _saves_in_process else None


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _KillAfterBytes:
    """File wrapper that SIGKILLs the process once ``limit`` bytes have been written."""

    def __init__(self, f, limit: int):
        self.f, self.left = f, limit

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) >= self.left:
            self.f.write(view[: self.left])
            self.f.flush()
            _die()
        self.left -= len(view)
        return self.f.write(view)

    def __getattr__(self, name: str):
        return getattr(self.f, name)


def _maybe_die(plan: dict[str, str] | None, phase: str) -> None:
    if plan is not None and plan.get("at") == phase:
        _die()


# --------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------


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
    """Write ``state`` (plus its manifest) to ``path`` atomically; return the size in bytes.

    ``state``: nested dicts/lists/tuples of tensors (any device) and plain values; the file
    holds them on the CPU. A ``manifest`` key in ``state`` is replaced by a new one."""
    global _saves_in_process
    _saves_in_process += 1
    plan = _crash_plan()
    state = host_copy({k: v for k, v in state.items() if k != "manifest"})  # the one device -> host copy
    checksum, count = tensor_checksum(state)
    state = {**state, "manifest": {"format": FORMAT, "checksum": checksum, "tensors": count,
                                   "step": state.get("step")}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            _maybe_die(plan, "before_write")
            target = _KillAfterBytes(f, int(plan["bytes"])) if plan and "bytes" in plan else f
            torch.save(state, target)
            f.flush()
            _maybe_die(plan, "after_write")
            os.fsync(f.fileno())
        _maybe_die(plan, "after_fsync")
        size = tmp.stat().st_size
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; checkpoints are ordinary files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _maybe_die(plan, "after_replace")
    _fsync_dir(path.parent)
    return size


def link_checkpoint(source: Path, target: Path) -> None:
    """Make ``target`` hold the same bytes as ``source`` atomically: a hard link (no copy)
    where the file system allows, a copy otherwise. Replacing ``source`` later leaves
    ``target`` unchanged. A sharded folder (``*.dcp``) becomes a folder of hard links to its
    files (:func:`lmkit.training.sharded.link_folder`)."""
    import shutil

    if source.is_dir():
        from lmkit.training.sharded import link_folder

        link_folder(source, target)
        return
    plan = _crash_plan()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here: a durable copy instead
            shutil.copyfile(source, tmp)
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, _FILE_MODE)
        _maybe_die(plan, "after_link")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete temporary files and folders left by saves that were killed; return what was
    removed. A sharded folder displaced by a save killed between its two renames
    (``.TAG.dcp.<token>.old``) is put back under ``TAG.dcp`` when that name is empty."""
    import shutil

    from lmkit.training.sharded import OLD_DIR_PATTERN, TMP_DIR_PATTERN, restore_or_remove_old

    removed = []
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            is_dir = path.is_dir() and not path.is_symlink()
            if is_dir and TMP_DIR_PATTERN.match(path.name):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            elif is_dir and OLD_DIR_PATTERN.match(path.name):
                gone = restore_or_remove_old(path)
                if gone is not None:
                    removed.append(gone)
            elif not is_dir and TMP_PATTERN.match(path.name):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


# --------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------


def _torch_load(path: Path, **kw: Any) -> Any:
    """``torch.load(path, weights_only=True, ...)`` without torch's ``UserWarning`` about a
    pickle protocol it did not write ("Detected pickle protocol 4 in the checkpoint ..."): a
    foreign file gets lmkit's own one-line error, not a warning printed before it. Only that
    warning, and only around this call, is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected pickle protocol", category=UserWarning)
        return torch.load(path, weights_only=True, **kw)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint (``weights_only=True``).

    A sharded folder (``*.dcp``, FSDP) is consolidated in this process
    (:func:`lmkit.training.sharded.load_consolidated`): ``model`` is a full state dict keyed
    like the unwrapped model's, with the fields of its ``extra`` and its ``manifest``; the
    optimizer is omitted (resume loads it with :func:`~lmkit.training.sharded.load_sharded`);
    its tensors are on the CPU whatever ``map_location`` says.

    Raises:
        CheckpointError: missing, truncated, not a torch file, holding objects that would
            need code to unpickle, or not matching its manifest -- naming the file.
    """
    path = Path(path)
    if path.is_dir():
        from lmkit.training.sharded import load_consolidated

        return load_consolidated(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = _torch_load(path, map_location=map_location)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        text = str(exc)
        if "Unsupported global" in text or "weights_only" in text.lower():
            why = "it contains Python objects that would run code when loaded; refused"
        elif "central directory" in text or "EOF" in text or isinstance(exc, EOFError):
            why = "truncated: the end of the file is missing"
        else:
            why = f"truncated or not a checkpoint: {first_line(exc, 120)}"
        raise CheckpointError(f"{path}: cannot be loaded ({why})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not an lmkit checkpoint (no model weights)")
    manifest = state.get("manifest")
    if not isinstance(manifest, dict) or "checksum" not in manifest:
        raise CheckpointError(f"{path}: has no manifest (written by an older lmkit or another tool)")
    if int(manifest.get("format", 0)) > FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {manifest['format']} is newer than this lmkit "
                              f"reads ({FORMAT}); upgrade lmkit")
    checksum, count = tensor_checksum(state)
    if checksum != manifest["checksum"] or count != manifest.get("tensors"):
        raise CheckpointError(f"{path}: corrupt (tensor checksum {checksum} != manifest {manifest['checksum']})")
    return state


def peek_step(path: Path) -> int | None:
    """The step stored in a checkpoint, read through a memory map (no full load);
    ``None`` when the file cannot be read. A sharded folder: the step of its manifest."""
    if path.is_dir():
        from lmkit.training.sharded import peek_manifest_step

        return peek_manifest_step(path)
    try:
        return int(_torch_load(path, map_location="cpu", mmap=True)["step"])
    except Exception:  # noqa: BLE001 - any unreadable file
        return None


@dataclass(frozen=True)
class Candidate:
    path: Path
    state: dict[str, Any]


CHECKPOINT_SUFFIXES = (".pt", ".dcp")  # a single file; a sharded folder (FSDP)


def checkpoint_by_name(directory: Path, name: str) -> Path:
    """``latest``/``best``/``step_…``/``epoch_…`` in ``directory`` (``NAME.pt``, else an
    existing ``NAME.dcp`` folder; ``NAME.pt`` when neither exists), or a path to a file or
    folder."""
    as_path = Path(name).expanduser()
    if as_path.suffix in CHECKPOINT_SUFFIXES and (as_path.exists() or "/" in name):
        return as_path
    if as_path.suffix in CHECKPOINT_SUFFIXES:
        return directory / name
    single, sharded = directory / f"{name}.pt", directory / f"{name}.dcp"
    return sharded if not single.exists() and sharded.is_dir() else single


def existing_checkpoint(directory: Path, name: str, run: Path | str, *, best_falls_back: bool = False) -> Path:
    """:func:`checkpoint_by_name` that must exist; ``best_falls_back``: ``best`` missing means
    ``latest`` (a run that never evaluated).

    Raises:
        CheckpointError: no such checkpoint, naming the ones ``run`` has (one line).
    """
    path = checkpoint_by_name(directory, name)
    if best_falls_back and name == "best" and not path.exists():
        path = checkpoint_by_name(directory, "latest")
    if not path.exists():
        have = sorted(p.stem for p in checkpoint_paths(directory))
        raise CheckpointError(f"{path}: no such checkpoint in {run} (have: {', '.join(have) or 'none'})")
    return path


def checkpoint_paths(directory: Path) -> list[Path]:
    """The checkpoints in ``directory``: ``*.pt`` files and ``*.dcp`` folders, no temporary
    ones (names starting with a dot), sorted by name."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and not p.name.startswith("."))


def verify_candidate(path: Path) -> dict[str, Any]:
    """What :func:`newest_complete` keeps of a checkpoint: the loaded state of a file; for a
    sharded folder, the folder verified (every file's size and CRC-32, DCP's metadata read as
    data) and its ``extra`` with ``manifest`` -- no tensors of the model (:func:`lmkit.training.sharded.load_sharded`
    loads them into a model).

    Raises:
        CheckpointError: as :func:`load_checkpoint`.
    """
    if path.is_dir():
        from lmkit.training.sharded_files import load_extra, read_metadata, verify_sharded

        manifest = verify_sharded(path)
        read_metadata(path, manifest)  # refused here if it would run code, before anything loads it
        return load_extra(path, manifest)
    return load_checkpoint(path)


def newest_complete(directory: Path) -> tuple[Candidate, list[tuple[Path, str]]]:
    """The newest checkpoint in ``directory`` that loads and verifies, and the ones that
    were skipped (path, reason). ``latest`` (``.pt`` or ``.dcp``) is tried first, then the
    others newest first (by modification time). For a sharded folder the candidate's
    ``state`` is :func:`verify_candidate`'s (its ``extra``, no model tensors).

    Raises:
        CheckpointError: no complete checkpoint at all.
    """
    files = checkpoint_paths(directory)
    if not files:
        raise CheckpointError(f"{directory}: no checkpoints to resume from")
    files.sort(key=lambda p: (p.stem != "latest", -p.stat().st_mtime_ns, p.name))
    skipped: list[tuple[Path, str]] = []
    best: Candidate | None = None
    for path in files:
        try:
            state = verify_candidate(path)
        except CheckpointError as exc:
            text, inside = str(exc), f"{path}{os.sep}"
            skipped.append((path, text[len(inside):] if text.startswith(inside) else text.split(": ", 1)[-1]))
            continue
        if best is None or int(state["step"]) > int(best.state["step"]):
            best = Candidate(path, state)
        if path.stem == "latest":
            break  # a complete latest is by construction the newest
    if best is None:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise CheckpointError(f"{directory}: no complete checkpoint ({reasons})")
    return best, skipped
