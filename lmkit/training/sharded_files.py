"""The files of a sharded checkpoint folder: manifest, verification, and reading them as data.

Layout and crash rule: :mod:`lmkit.training.sharded`. Here:

* ``lmkit_manifest.json``: ``kind``/``format``, ``step``, ``world_size``, whether the
  optimizer is in the folder, and every file with its size in bytes and CRC-32, the whole
  under a CRC-32 of its own (``checksum``). :func:`verify_sharded` checks the manifest, then
  each file's size (truncation) and CRC-32 (bit rot, tampering); on several ranks each rank
  checks a share of the files and the verdict is agreed, so every rank raises the same
  one-line :class:`~lmkit.errors.CheckpointError` naming the bad file (never a hang).
* Safety: DCP's ``FileSystemReader`` unpickles ``.metadata`` with plain :mod:`pickle`, and its
  default load planner reads non-tensor values with ``torch.load(weights_only=False)``.
  lmkit reads ``.metadata`` with :class:`MetadataUnpickler` (only DCP's metadata classes
  and the few plain types they hold) and non-tensor values with ``weights_only=True``; a
  folder without lmkit's manifest is refused. A checkpoint is data, never code.
"""

from __future__ import annotations

import io
import json
import pickle
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmkit.errors import CheckpointError, first_line
from lmkit.training import checkpoint as _ckpt
from lmkit.training.crc import file_crc32

if TYPE_CHECKING:  # pragma: no cover
    from lmkit.training.distributed import Distributed

SUFFIX = ".dcp"
KIND = "lmkit-dcp"
FORMAT = 1
MANIFEST = "lmkit_manifest.json"
EXTRA = "extra.pt"
METADATA = ".metadata"


def is_sharded(path: Path) -> bool:
    """Whether ``path`` names a sharded checkpoint folder (``*.dcp``)."""
    return Path(path).suffix == SUFFIX


# --------------------------------------------------------------------------------------
# Reading DCP's metadata as data
# --------------------------------------------------------------------------------------

_DCP_META = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    *((_DCP_META, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                     "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                     "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("pathlib._local", "PosixPath"), ("pathlib._local", "WindowsPath"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
}


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler for DCP's ``.metadata``: only DCP's metadata classes, ``torch.Size``,
    dtypes and layouts, paths and plain containers; anything else (a function to call, a
    class of another module) raises :class:`pickle.UnpicklingError` before it is imported."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def read_metadata(path: Path, manifest: dict[str, Any] | None = None) -> Any:
    """DCP's :class:`~torch.distributed.checkpoint.metadata.Metadata` of folder ``path``, through
    :class:`MetadataUnpickler`. With ``manifest``, every file the metadata points at must be
    one the manifest lists (no path outside the folder).

    Raises:
        CheckpointError: unreadable, or it would need code to load -- naming the file.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    file = Path(path) / METADATA
    try:
        with file.open("rb") as f:
            metadata = MetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{file}: cannot be loaded (it contains Python objects that would run code "
                              f"when loaded; refused: {first_line(exc, 100)})") from None
    except Exception as exc:  # noqa: BLE001 - a damaged pickle raises many types
        raise CheckpointError(f"{file}: cannot be loaded ({first_line(exc, 120)})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file}: not DCP metadata")
    if manifest is not None:
        for info in (metadata.storage_data or {}).values():
            name = getattr(info, "relative_path", None)
            if name not in manifest["files"]:
                raise CheckpointError(f"{file}: points at {name!r}, which the manifest does not list")
    return metadata


def _reader(path: Path, manifest: dict[str, Any]) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        """DCP's file reader with :func:`read_metadata` (no rank-local metadata fallback)."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:
                raise CheckpointError(f"{path}: has no rank-local metadata")
            metadata = read_metadata(path, manifest)
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def refusal(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused: code it would run, or the first line."""
    text = str(exc)
    if "Unsupported global" in text or "weights_only" in text.lower():
        return "it contains Python objects that would run code when loaded; refused"
    return first_line(exc, 120)


def _safe_load_bytes(planner: Any, read_item: Any, value: io.BytesIO) -> None:
    from torch.distributed.checkpoint._traverse import set_element as set_nested

    try:
        obj = torch.load(value, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - weights_only refusals and damaged bytes
        raise CheckpointError(f"{planner.checkpoint_path}: value {read_item.dest_index.fqn} cannot be loaded "
                              f"({refusal(exc)})") from None
    if planner.flatten_state_dict:
        set_nested(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj


def _planner(path: Path, empty: bool = False, keys: set[str] | None = None) -> Any:
    """DCP's default load planner (or the one that rebuilds a state dict from the metadata),
    reading non-tensor values with ``torch.load(weights_only=True)``."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

    base = _EmptyStateDictLoadPlanner if empty else DefaultLoadPlanner

    class SafePlanner(base):  # type: ignore[misc, valid-type]
        checkpoint_path = path

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            _safe_load_bytes(self, read_item, value)

    return SafePlanner(keys=keys) if empty else SafePlanner()


# --------------------------------------------------------------------------------------
# Manifest and files
# --------------------------------------------------------------------------------------


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return f"{zlib.crc32(json.dumps(body, sort_keys=True).encode()):08x}"


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of sharded checkpoint ``path``, its own checksum verified.

    Raises:
        CheckpointError: no such folder, no manifest (not written by lmkit: refused), or a
            manifest that does not parse or verify -- naming the file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint")
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{path}: not an lmkit checkpoint (no {MANIFEST}: not written by lmkit, or its "
                              "save did not finish); refused")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot be read ({first_line(exc, 100)})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{file}: not an lmkit sharded-checkpoint manifest")
    if int(manifest.get("format", 0)) > FORMAT:
        raise CheckpointError(f"{file}: sharded-checkpoint format {manifest['format']} is newer than this lmkit "
                              f"reads ({FORMAT}); upgrade lmkit")
    if manifest.get("checksum") != _manifest_checksum(manifest):
        raise CheckpointError(f"{file}: corrupt (its checksum does not match its contents)")
    for name, entry in manifest["files"].items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CheckpointError(f"{file}: lists a file outside the folder ({name!r})")
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("crc32"), str)):
            raise CheckpointError(f"{file}: the entry of {name} is not {{bytes, crc32}}")
    for name in (METADATA, EXTRA):
        if name not in manifest["files"]:
            raise CheckpointError(f"{file}: does not list {name}")
    return manifest


def _check_file(path: Path, name: str, entry: dict[str, Any], crc: bool) -> str | None:
    """Why file ``name`` of folder ``path`` does not match its manifest ``entry``; None if it does."""
    file = path / name
    try:
        size = file.stat().st_size
    except OSError:
        return f"{file}: missing"
    if size != entry.get("bytes"):
        return f"{file}: truncated or overwritten ({size} bytes, manifest says {entry.get('bytes')})"
    if crc:
        try:
            got = file_crc32(file)
        except OSError as exc:
            return f"{file}: cannot be read ({first_line(exc, 100)})"
        if got != entry.get("crc32"):
            return f"{file}: corrupt (CRC-32 {got} != manifest {entry.get('crc32')})"
    return None


def verify_sharded(path: Path, dist: Distributed | None = None, crc: bool = True) -> dict[str, Any]:
    """Verify folder ``path`` against its manifest and return the manifest: every file's size
    (on every rank) and, with ``crc``, its CRC-32 (each rank a share of the files under
    ``dist``; the verdict is agreed, so every rank raises the same error).

    Raises:
        CheckpointError: see :func:`read_manifest`; a file missing, truncated or corrupt.
    """
    path = Path(path)
    error: str | None = None
    manifest: dict[str, Any] = {}
    try:
        manifest = read_manifest(path)
    except CheckpointError as exc:
        error = str(exc)
    started = dist is not None and dist.started
    world, rank = (dist.world_size, dist.rank) if started else (1, 0)
    if error is None:
        names = sorted(manifest["files"])
        for i, name in enumerate(names):
            error = _check_file(path, name, manifest["files"][name], crc=crc and i % world == rank)
            if error:
                break
    if started:
        errors = [e for e in dist.all_gather_object(error) if e]
        error = errors[0] if errors else None
    if error:
        raise CheckpointError(error)
    return manifest


def load_extra(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """``extra.pt`` of a verified folder (``weights_only=True``), with the manifest under ``manifest``."""
    file = Path(path) / EXTRA
    try:
        extra = _ckpt._torch_load(file, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises many types
        raise CheckpointError(f"{file}: cannot be loaded ({refusal(exc)})") from None
    if not isinstance(extra, dict):
        raise CheckpointError(f"{file}: not an lmkit checkpoint's state")
    if manifest.get("step") != extra.get("step"):
        raise CheckpointError(f"{file}: step {extra.get('step')} != manifest step {manifest.get('step')}")
    return {**extra, "manifest": manifest}


def peek_manifest_step(path: Path) -> int | None:
    """The step in a folder's manifest (no verification); None when unreadable."""
    try:
        return int(json.loads((Path(path) / MANIFEST).read_text())["step"])
    except Exception:  # noqa: BLE001 - any unreadable folder
        return None


__all__ = ["EXTRA", "FORMAT", "KIND", "MANIFEST", "METADATA", "SUFFIX", "MetadataUnpickler", "file_crc32",
           "is_sharded", "load_extra", "peek_manifest_step", "read_manifest", "read_metadata", "verify_sharded"]
