"""Text sources, loaded through Hugging Face ``datasets``.

``data.dataset`` may be:

* a local file: ``.txt``/``.raw``/any other suffix is text (one row per line),
  ``.jsonl``/``.json`` is JSON lines (column ``data.text_field``), ``.parquet`` is Parquet;
* a local folder: its files named ``*train*``, ``*valid*``/``*val*``, ``*test*`` give those
  splits; if none is named so, all files are training text;
* a hub name from :data:`HUB_SOURCES` (``wikitext-2-raw-v1``, ``wikitext-103-raw-v1``,
  ``fineweb-edu`` (streamed), ``europarl``) or ``hf:owner/name[:config]``.

A source without a validation split is split by rows: the last ``val_fraction`` of the
rows becomes ``val`` (contiguous, so no line of val text is seen in training). Nothing
is downloaded at import time; with no network a hub name fails at once with one line
that shows the local-file form.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lmkit.config import DataConfig
from lmkit.errors import DataError, first_line


@dataclass(frozen=True)
class HubSource:
    """How to read one hub data set."""

    path: str
    name: str | None
    text_field: str = "text"
    streaming: bool = False
    #: "newline": rows are lines of one text; "eos": rows are documents, separated by EOS.
    separator: str = "newline"
    #: extra keyword arguments for ``datasets.load_dataset`` (e.g. ``data_files``).
    kwargs: dict[str, Any] = field(default_factory=dict)


HUB_SOURCES: dict[str, HubSource] = {
    "wikitext-2-raw-v1": HubSource("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "wikitext-103-raw-v1": HubSource("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "fineweb-edu": HubSource("HuggingFaceFW/fineweb-edu", "sample-10BT", streaming=True, separator="eos"),
    # English side of the en-fr pairs: one sentence per row.
    "europarl": HubSource("Helsinki-NLP/europarl", "en-fr", text_field="translation.en"),
}

TEXT_SUFFIXES_JSON = (".jsonl", ".json")
TEXT_SUFFIXES_PARQUET = (".parquet",)
_SPLIT_NAMES = {"train": "train", "training": "train", "valid": "val", "validation": "val", "val": "val",
                "dev": "val", "test": "test"}


@dataclass
class TextSource:
    """Splits of rows of text, ready to be tokenised.

    Attributes:
        splits: split name (``train``, ``val``, maybe ``test``) -> a function returning a
            fresh iterator over the rows' texts.
        n_rows: rows per split (``None`` for streamed splits).
        fingerprint: changes whenever the text could have changed (file contents hash,
            hub data set fingerprint).
        separator: ``"newline"`` (rows are lines) or ``"eos"`` (rows are documents).
        description: for messages, e.g. ``"input.txt (40,000 lines)"``.
    """

    splits: dict[str, Callable[[], Iterator[str]]]
    n_rows: dict[str, int | None]
    fingerprint: str
    separator: str
    description: str
    streaming: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def is_hub_name(name: str) -> bool:
    return name in HUB_SOURCES or name.startswith("hf:")


def load_text_source(config: DataConfig, *, fields: list[str] | None = None) -> TextSource:
    """Open ``config.dataset`` as a :class:`TextSource`.

    Args:
        config: the data settings (``dataset``, ``text_field``, ``encoding``, ``val_fraction``).
        fields: JSON/JSONL/parquet (or hub) columns whose values are joined with a newline
            into each row's text (e.g. ``["question", "answer"]`` for GSM8K); ``None`` reads
            ``config.text_field`` alone. Text files have no columns.

    Raises:
        DataError: missing path, undecodable text (naming the file, byte and what to
            pass to ``--encoding``), no usable split, a missing column, or an unreachable hub.
    """
    _quiet_datasets()
    name = config.dataset
    if is_hub_name(name):
        return _load_hub(name, config, fields)
    path = Path(name).expanduser()
    if not path.exists():
        known = ", ".join(["arithmetic", *HUB_SOURCES])
        raise DataError(f"data.dataset: {name!r} is not a file or folder, nor a known data set ({known})")
    files = split_files(path)
    return _load_local(files, config, path, fields)


# --------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------


def split_files(path: Path) -> dict[str, list[Path]]:
    """The files of a local data set per split (``train``/``val``/``test``): a file is
    ``train``; a folder's files are named by split, or all ``train`` when none is named.

    Raises:
        DataError: an empty folder, or named splits without a training file.
    """
    if path.is_file():
        return {"train": [path]}
    # Hidden files and Spark/Hadoop markers (_SUCCESS, _metadata) are not data.
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
    if not files:
        raise DataError(f"data.dataset: folder {path} holds no files")
    named: dict[str, list[Path]] = {}
    for file in files:
        words = file.name.lower().replace("-", ".").replace("_", ".").split(".")
        split = next((_SPLIT_NAMES[w] for w in words if w in _SPLIT_NAMES), None)
        if split is not None:
            named.setdefault(split, []).append(file)
    if not named:
        return {"train": files}
    if "train" not in named:
        listed = ", ".join(f.name for f in files[:5])
        raise DataError(f"data.dataset: folder {path} has no training file (named *train*); it holds {listed}")
    return named


def _builder_for(files: list[Path]) -> str:
    suffixes = {f.suffix.lower() for f in files}
    if suffixes <= set(TEXT_SUFFIXES_JSON):
        return "json"
    if suffixes <= set(TEXT_SUFFIXES_PARQUET):
        return "parquet"
    if suffixes & (set(TEXT_SUFFIXES_JSON) | set(TEXT_SUFFIXES_PARQUET)):
        raise DataError(f"data.dataset: mixed file types {sorted(suffixes)}; keep one format per data set")
    return "text"


def check_encoding(file: Path, encoding: str) -> str:
    """Decode ``file`` with ``encoding`` in 16 MiB chunks; return its SHA-256.

    Raises:
        DataError: the first undecodable byte, naming the file, offset and a fix.
    """
    import codecs

    decoder = codecs.getincrementaldecoder(encoding)()
    digest = hashlib.sha256()
    offset = 0
    with file.open("rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
            try:
                decoder.decode(chunk)
            except UnicodeError as exc:
                hint = "latin-1" if encoding.replace("_", "-").lower() in ("utf-8", "utf8") else "utf-8"
                start = getattr(exc, "start", None)
                where = (f"byte 0x{chunk[start]:02x} at offset {offset + start}" if isinstance(start, int)
                         and start < len(chunk) else str(exc))
                raise DataError(
                    f"{file}: not valid {encoding} ({where}); pass --encoding {hint} (or the file's real encoding)"
                ) from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeError:
            raise DataError(f"{file}: ends inside a {encoding} character (truncated file?)") from None
    return digest.hexdigest()


def _load_local(files: dict[str, list[Path]], config: DataConfig, root: Path,
                fields: list[str] | None = None) -> TextSource:
    import datasets

    all_files = [f for group in files.values() for f in group]
    builder = _builder_for(all_files)
    if fields is not None and builder == "text":
        raise DataError(f"data.sources: {root} is plain text (one row per line); fields apply to "
                        "JSON/JSONL/parquet rows -- drop fields for this source")
    columns = fields if fields is not None else [config.text_field]
    field_key = config.text_field if fields is None else "fields=" + "+".join(fields)
    digest = hashlib.sha256(f"{builder}|{config.encoding}|{field_key}".encode())
    for split, group in sorted(files.items()):
        for file in group:
            if file.stat().st_size == 0:
                raise DataError(f"data.dataset: {file} is empty")
            if builder == "text":
                file_hash = check_encoding(file, config.encoding)
            else:
                file_hash = _file_sha256(file)
            digest.update(f"{split}:{file.name}:{file_hash}".encode())
    kwargs: dict[str, Any] = {}
    if builder == "text":
        kwargs = {"encoding": config.encoding, "keep_linebreaks": True}
    data_files = {split: [str(f) for f in group] for split, group in files.items()}
    try:
        dsd = datasets.load_dataset(builder, data_files=data_files, **kwargs)
    except Exception as exc:
        raise DataError(f"data.dataset: cannot read {root} as {builder} ({first_line(exc)})") from None
    if builder == "text":
        columns = ["text"]
    for split, ds in dsd.items():
        for column in columns:
            if column.split(".")[0] not in ds.column_names:
                fix = ("list the source's fields" if fields is not None
                       else "set --set data.text_field=NAME")
                raise DataError(
                    f"{'data.sources' if fields is not None else 'data.text_field'}: {root} ({split}) has no "
                    f"column {column!r}; columns: {', '.join(ds.column_names)} ({fix})"
                )
    separator = "newline" if builder == "text" else "eos"
    splits = {_SPLIT_NAMES.get(k, k): v for k, v in dsd.items()}
    return _from_datasets(splits, columns, digest.hexdigest()[:16], separator, str(root), config)


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _from_datasets(splits: dict[str, Any], columns: list[str], fingerprint: str, separator: str,
                   label: str, config: DataConfig) -> TextSource:
    if "val" not in splits:
        train = splits["train"]
        n = len(train)
        n_val = max(1, int(round(n * config.val_fraction)))
        if n - n_val < 1:
            raise DataError(f"data.dataset: {label} has only {n} rows, too few to split off a validation set")
        splits = dict(splits)
        splits["train"] = train.select(range(n - n_val))
        splits["val"] = train.select(range(n - n_val, n))
        fingerprint = f"{fingerprint}-val{config.val_fraction}"
    paths = [column.split(".") for column in columns]

    def rows(ds: Any) -> Callable[[], Iterator[str]]:
        def iterate() -> Iterator[str]:
            for batch in ds.iter(batch_size=1000):
                for i in range(len(batch[paths[0][0]])):
                    parts = []
                    for column, path in zip(columns, paths, strict=True):
                        value = batch[path[0]][i]
                        for sub in path[1:]:
                            value = value[sub] if isinstance(value, dict) else None
                        if isinstance(value, str):
                            parts.append(value)
                        elif value is not None:
                            what = "data.text_field" if len(columns) == 1 else "data.sources fields"
                            raise DataError(f"{what}: {column!r} of {label} holds "
                                            f"{type(value).__name__} values, not text")
                    if parts:
                        yield "\n".join(parts)

        return iterate

    n_rows = {k: len(v) for k, v in splits.items()}
    desc = f"{label} ({', '.join(f'{k} {v:,} rows' for k, v in n_rows.items())})"
    return TextSource({k: rows(v) for k, v in splits.items()}, n_rows, fingerprint, separator, desc)


# --------------------------------------------------------------------------------------
# Hub
# --------------------------------------------------------------------------------------


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A 3-second TCP connect to the hub endpoint. Behind an HTTP(S) proxy a direct
    connect says nothing, so the hub is then assumed reachable and ``datasets`` decides."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return True
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        endpoint = constants.ENDPOINT
    except ImportError:  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_if_unreachable() -> Iterator[bool]:
    """Switch ``datasets`` to offline mode (cached copies only) when the hub cannot be
    reached, so a missing network fails in a second instead of after ~25 s of retries."""
    online = _hub_reachable()
    if online:
        yield True
        return
    import datasets.config
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _load_hub(name: str, config: DataConfig, fields: list[str] | None = None) -> TextSource:
    import datasets

    if name.startswith("hf:"):
        repo, _, subset = name[3:].partition(":")
        spec = HubSource(repo, subset or None, text_field=config.text_field, separator="eos")
    else:
        spec = HUB_SOURCES[name]
    if fields is not None and spec.streaming:
        raise DataError(f"data.sources: {name!r} is streamed; fields are read from non-streamed data sets only")
    with _offline_if_unreachable() as online:
        try:
            loaded = datasets.load_dataset(spec.path, spec.name, streaming=spec.streaming, **spec.kwargs)
        except Exception as exc:
            why = "no network and no cached copy" if not online else first_line(exc)
            raise DataError(
                f"data.dataset: cannot load {name!r} from the Hugging Face hub ({why}); "
                f"use a local file instead, e.g. --data path/to/train.txt (or a folder with "
                f"train/valid files)"
            ) from None
    splits = {_SPLIT_NAMES.get(k, k): v for k, v in loaded.items()}
    if "train" not in splits:
        raise DataError(f"data.dataset: {name!r} has no train split (splits: {', '.join(loaded)})")
    if spec.streaming:
        return _from_stream(name, spec, splits, config)
    fingerprint = hashlib.sha256(
        "|".join(f"{k}:{getattr(v, '_fingerprint', '')}" for k, v in sorted(splits.items())).encode()
    ).hexdigest()[:16]
    if fields is not None:
        fingerprint = hashlib.sha256(f"{fingerprint}|fields={'+'.join(fields)}".encode()).hexdigest()[:16]
    columns = fields if fields is not None else [spec.text_field]
    return _from_datasets(splits, columns, fingerprint, spec.separator, name, config)


def _from_stream(name: str, spec: HubSource, splits: dict[str, Any], config: DataConfig) -> TextSource:
    """A streamed source: documents are read in order; with no val split, the first
    documents (about ``val_fraction`` of ``max_tokens``, at most 10M tokens) are val."""
    if config.max_tokens is None:
        raise DataError(f"data.max_tokens: {name!r} is streamed; set how many tokens to take "
                        "(e.g. --set data.max_tokens=100000000)")
    fields = spec.text_field.split(".")

    def rows(ds: Any) -> Callable[[], Iterator[str]]:
        def iterate() -> Iterator[str]:
            for example in ds:
                value: Any = example
                for sub in fields:
                    value = value.get(sub) if isinstance(value, dict) else None
                if isinstance(value, str):
                    yield value

        return iterate

    fingerprint = hashlib.sha256(f"{spec.path}|{spec.name}|{spec.text_field}".encode()).hexdigest()[:16]
    out = {"train": rows(splits["train"])}
    if "val" in splits:
        out["val"] = rows(splits["val"])
    return TextSource(out, {k: None for k in out}, fingerprint, spec.separator, f"{name} (streamed)",
                      streaming=True)



_QUIET = False


def _quiet_datasets() -> None:
    """The library never prints: silence ``datasets``' own progress bars and logs."""
    global _QUIET
    if _QUIET:
        return
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    with contextlib.suppress(ImportError):
        import huggingface_hub.utils as hf_utils

        hf_utils.disable_progress_bars()
    _QUIET = True
