"""Token shards: text tokenised once into memory-mapped arrays, reused while unchanged.

Layout of one cache entry (``$LMKIT_CACHE_DIR`` or ``~/.cache/lmkit``, then
``tokens/<name>-<key>/``)::

    meta.json        tokenizer kind + fingerprint, vocab_size, dtype, per split: tokens,
                     max id, file; the source's fingerprint; lmkit version
    train.bin        raw uint16 (vocab <= 65,536) or uint32 token ids, no header
    train.bytes      per token, the UTF-8 bytes of the text it covers (raw uint8, or uint16
                     when a token covers more than 255 bytes; see meta.json), no header
    val.bin, val.bytes
    test.bin, ...    when the source has a test split
    tokenizer/       the tokenizer that made them (trained BPE / text char alphabets)

``meta.json`` also records per split the number of text bytes and the SHA-256 of the
UTF-8 text that was tokenized (``text_sha256``: rows as tokenized, newlines included, no
separators), which identifies the data independently of the tokenizer. Entries written
before the ``.bytes`` files existed still load: :meth:`TokenShards.token_bytes` is then
``None`` and bits per byte falls back to a per-id table.

``key`` hashes the source fingerprint (file contents or hub fingerprint) and every
setting that changes the ids (added tokens and a local ``hf:`` tokenizer file's contents
included; ``data.condition``, ``data.legacy_regex`` in the ``mul_tokens`` condition and
``data.include_synthetic``), so editing a file, changing the tokenizer or switching the
condition rebuilds.

With ``data.condition`` set (the domain-token experiment, ``gpt2+mul``), rows are encoded by
:class:`~lmkit.data.shard_rows.RowEncoder` (injection in ``mul_tokens``, each mul token counting
the bytes of the text it replaced), ``data.include_synthetic`` puts the drill block of
:mod:`lmkit.data.synthetic` first in the training split, and ``meta.json`` keeps the data stats
(:attr:`TokenShards.stats`).
An entry is written to a temporary folder and renamed into place, so an interrupted
build never leaves a half-written cache that looks complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmkit import __version__
from lmkit.config import DataConfig
from lmkit.data.shard_rows import RowEncoder, ShardStats, batched, take_budget
from lmkit.data.sources import TextSource
from lmkit.data.synthetic import synthetic_drills
from lmkit.data.token_bytes import ByteCountWriter
from lmkit.data.tokenizer_mul import check_data_condition, expected_added
from lmkit.data.tokenizers import AddedToken, Tokenizer, build_tokenizer, load_tokenizer
from lmkit.errors import DataError
from lmkit.events import DataProgress, Event

SHARD_FORMAT = 1
_BATCH_ROWS = 2048
_BATCH_CHARS = 1 << 20  # ~250k GPT-2 tokens: a progress event every fraction of a second
#: Seconds between two progress events of one split.
PROGRESS_INTERVAL = 0.5


def cache_root(config: DataConfig) -> Path:
    """Where token caches live: ``data.cache_dir``, ``$LMKIT_CACHE_DIR`` or ``~/.cache/lmkit``."""
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    env = os.environ.get("LMKIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lmkit"


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65,536), else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class TokenShards:
    """A ready cache entry: ``tokens(split)`` is a read-only memory map of ids."""

    directory: Path
    meta: dict
    reused: bool

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def count(self, split: str) -> int:
        return int(self.meta["splits"][split]["tokens"])

    def max_id(self, split: str) -> int:
        return int(self.meta["splits"][split]["max_id"])

    #: Shards up to this many tokens are scanned for out-of-range ids at start-up; larger
    #: ones rely on meta.json and the per-batch check of the training loop.
    SCAN_LIMIT = 1 << 28

    def scan_max_id(self) -> int:
        """The largest id actually stored in the (not too large) shards, -1 if none scanned."""
        largest = -1
        for split in self.splits:
            if self.count(split) <= self.SCAN_LIMIT:
                tokens = self.tokens(split)
                for start in range(0, len(tokens), 1 << 24):
                    largest = max(largest, int(tokens[start : start + (1 << 24)].max()))
        return largest

    def tokens(self, split: str) -> np.ndarray:
        """The ids of ``split`` as a 1-D read-only memmap.

        Raises:
            DataError: the file is missing, or its size does not match ``meta.json``
                (truncated, or written with another dtype).
        """
        info = self.meta["splits"][split]
        path = self.directory / info["file"]
        expected = int(info["tokens"]) * self.dtype.itemsize
        try:
            size = path.stat().st_size
        except OSError:
            raise DataError(f"{path}: token shard is missing; delete {self.directory} to rebuild it") from None
        if size != expected:
            raise DataError(
                f"{path}: {size} bytes but meta.json says {info['tokens']} {self.dtype} tokens "
                f"({expected} bytes); the shard is truncated or corrupt -- delete {self.directory} to rebuild"
            )
        if expected == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    def has_token_bytes(self) -> bool:
        """Every split has its per-token byte counts (entries written since they exist)."""
        return all("bytes_file" in self.meta["splits"][s] for s in self.splits)

    def token_bytes(self, split: str) -> np.ndarray | None:
        """Per token of ``split``, the UTF-8 bytes of the text it covers: a 1-D read-only
        memmap aligned with :meth:`tokens` (``uint8`` or ``uint16``), or ``None`` for an
        entry written before these counts existed.

        Raises:
            DataError: the file is missing or its size does not match ``meta.json``.
        """
        info = self.meta["splits"][split]
        if "bytes_file" not in info:
            return None
        path = self.directory / info["bytes_file"]
        dtype = np.dtype(info["bytes_dtype"])
        expected = int(info["tokens"]) * dtype.itemsize
        try:
            size = path.stat().st_size
        except OSError:
            raise DataError(f"{path}: byte counts are missing; delete {self.directory} to rebuild it") from None
        if size != expected:
            raise DataError(f"{path}: {size} bytes but meta.json says {info['tokens']} {dtype} counts; "
                            f"the file is truncated or corrupt -- delete {self.directory} to rebuild")
        if expected == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def text_sha256(self, split: str) -> str | None:
        """SHA-256 of the UTF-8 text tokenized into ``split`` (``None`` for older entries)."""
        return self.meta["splits"][split].get("text_sha256")

    @property
    def stats(self) -> dict | None:
        """The data stats of an entry built with ``data.condition`` set (``None`` otherwise), kept in
        ``meta.json`` so a reused entry reports them too. Keys: ``condition``, ``legacy_regex``,
        ``include_synthetic``, ``total_tokens``, ``<split>_tokens``, ``total_documents``,
        ``mul_tokens``, ``mul_token_ratio`` (mul tokens / total tokens), ``mul_tokens_by_split``,
        ``baseline_tokens`` (the same text without injection), ``tokens_saved`` (baseline - total),
        ``token_reduction`` (saved / baseline), ``synthetic_tokens``."""
        return self.meta.get("stats")


def added_tokens_key(added: tuple[AddedToken, ...] | list[AddedToken]) -> str:
    """A short hash of added tokens (``-`` for none), for cache keys."""
    if not added:
        return "-"
    blob = json.dumps([[t.text, t.id, t.special] for t in sorted(added, key=lambda t: t.id)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_key(source: TextSource, config: DataConfig, added_tokens: tuple[AddedToken, ...] = (),
              tokenizer: Tokenizer | None = None) -> str:
    """The cache entry's key: the source fingerprint and every setting that changes the ids
    (``tokenizer``: the one given to :func:`prepare_shards`, keyed by its fingerprint).

    Raises:
        DataError: a local ``hf:`` tokenizer file that cannot be read.
    """
    parts = [
        f"format={SHARD_FORMAT}",
        f"source={source.fingerprint}",
        f"tokenizer={config.tokenizer}",
        f"bpe={config.bpe_vocab_size if config.tokenizer == 'bpe' else '-'}",
        f"max_tokens={config.max_tokens}",
        f"val_fraction={config.val_fraction if source.streaming else '-'}",
    ]
    # Parts that older entries lack are only added when they apply, so those entries stay valid.
    local = _local_tokenizer_file(config.tokenizer)
    if local is not None:
        try:
            parts.append(f"tokenizer_file={hashlib.sha256(local.read_bytes()).hexdigest()[:16]}")
        except OSError as exc:
            raise DataError(f"data.tokenizer: cannot read {local} ({exc.strerror})") from None
    if added_tokens:
        parts.append(f"added={added_tokens_key(added_tokens)}")
    if config.condition is not None:
        parts.append(f"condition={config.condition}")
        if config.condition == "mul_tokens":
            parts.append(f"legacy_regex={config.legacy_regex}")
            if not config.legacy_regex:  # the guarded rule changed once (digit groups): never reuse the old shards
                from lmkit.data.mul_tokens import GUARDED_PATTERN

                parts.append("guards=" + hashlib.sha256(GUARDED_PATTERN.encode()).hexdigest()[:8])
    if config.include_synthetic:
        parts.append("synthetic=42")
    if tokenizer is not None:
        parts.append(f"tokenizer_fingerprint={tokenizer.fingerprint()}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _local_tokenizer_file(name: str) -> Path | None:
    """The ``tokenizer.json`` of a local ``hf:PATH`` tokenizer (``None`` for hub names and other kinds)."""
    if not name.startswith("hf:"):
        return None
    path = Path(name[3:]).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    return path if path.is_file() else None


def _slug(text: str) -> str:
    base = Path(text).name if not text.startswith("hf:") else text[3:]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:40] or "data"


def prepare_shards(source: TextSource, config: DataConfig, emit: Callable[[Event], None],
                   added_tokens: tuple[AddedToken, ...] = (), *,
                   tokenizer: Tokenizer | None = None) -> tuple[TokenShards, Tokenizer]:
    """Tokenise ``source`` into shards, or reuse the cache entry made from the same input.

    Args:
        source: the text.
        config: the data settings (tokenizer, budget, cache folder, condition).
        emit: receives :class:`~lmkit.events.DataProgress` events (about every 0.5 s per split
            and once at its end: rows done, rows in the split when known, tokens written).
        added_tokens: tokens added to the tokenizer (after training it, for ``bpe``/``char``).
        tokenizer: encode with this tokenizer instead of building ``data.tokenizer`` (e.g. the
            one of the run a fine-tune starts from); ``added_tokens`` it lacks are added to it.

    Raises:
        DataError: a split with no tokens, bad added tokens, an unusable cache folder, or a
            ``data.condition`` that does not go with the tokenizer.
    """
    added_tokens = tuple(added_tokens)
    if tokenizer is not None:
        present = set(tokenizer.added_tokens)
        missing = [t for t in added_tokens if t not in present]
        if missing:
            tokenizer.add_tokens(missing)
        check_data_condition(config.condition, tokenizer.kind, getattr(tokenizer, "condition", None))
    else:
        check_data_condition(config.condition, config.tokenizer)
        # a tokenizer kind's own added tokens (gpt2+mul's 92) are not extra: the same cache entry
        # whether a caller (an evaluation rebuilding the val split) passes them again or not
        own = set(expected_added(config.tokenizer, ()))
        added_tokens = tuple(t for t in added_tokens if t not in own)
    root = cache_root(config) / "tokens"
    directory = root / f"{_slug(config.dataset)}-{cache_key(source, config, added_tokens, tokenizer)}"
    shards = _load_existing(directory)
    if shards is not None:
        loaded = load_tokenizer(directory / "tokenizer")
        expected = tokenizer.added_tokens if tokenizer is not None else expected_added(config.tokenizer, added_tokens)
        if added_tokens_key(loaded.added_tokens) == added_tokens_key(tuple(expected)):
            return shards, (tokenizer if tokenizer is not None else loaded)
        # Only a hand-edited entry gets here (its tokenizer is not the one asked for): rebuild it.
        shutil.rmtree(directory, ignore_errors=True)

    if tokenizer is None:
        tokenizer = _make_tokenizer(source, config, emit)
        if added_tokens:
            tokenizer.add_tokens(added_tokens)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=root))
    except OSError as exc:
        raise DataError(f"data.cache_dir: cannot write the token cache under {root} ({exc.strerror})") from None
    try:
        meta = _write_shards(source, config, tokenizer, tmp, emit)
        tokenizer.save(tmp / "tokenizer")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        winner = _load_existing(directory)
        if winner is not None:  # another process built the same entry meanwhile: use theirs
            return winner, load_tokenizer(directory / "tokenizer")
        if directory.exists():  # a stale, incomplete entry under the same key
            shutil.rmtree(directory, ignore_errors=True)
        try:
            os.replace(tmp, directory)
        except OSError:
            winner = _load_existing(directory)
            if winner is None:
                raise
            return winner, load_tokenizer(directory / "tokenizer")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return TokenShards(directory, meta, reused=False), tokenizer


def _load_existing(directory: Path) -> TokenShards | None:
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if meta.get("format") != SHARD_FORMAT:
        return None
    shards = TokenShards(directory, meta, reused=True)
    for split in shards.splits:
        shards.tokens(split)  # raises DataError with the file name when it does not match
        shards.token_bytes(split)
    return shards


def _make_tokenizer(source: TextSource, config: DataConfig, emit: Callable[[Event], None]) -> Tokenizer:
    needs_training = config.tokenizer in ("bpe", "char")
    if not needs_training:
        return build_tokenizer(config.tokenizer, condition=config.condition)
    emit(DataProgress(stage=f"train {config.tokenizer} tokenizer", completed=0, total=None, unit=""))
    rows = source.splits["train"]()
    if source.streaming and "val" not in source.splits:
        # The first documents of the stream become val: keep them out of tokenizer training.
        # The val budget is in tokens and the tokenizer does not exist yet, so skip a
        # generous 8 characters per val token (English BPE averages about 4).
        rows = _skip_chars(rows, 8 * _stream_val_tokens(config))
    texts = _limited(rows, config.max_tokens)
    tokenizer = build_tokenizer(config.tokenizer, train_texts=texts, bpe_vocab_size=config.bpe_vocab_size)
    emit(DataProgress(stage=f"train {config.tokenizer} tokenizer", completed=1, total=1, unit=""))
    return tokenizer


def _skip_chars(rows: Iterator[str], n_chars: int) -> Iterator[str]:
    for row in rows:
        if n_chars <= 0:
            yield row
        n_chars -= len(row)


def _limited(rows: Iterator[str], max_tokens: int | None) -> Iterator[str]:
    """For tokenizer training on huge/streamed corpora: stop after ~4 chars per token."""
    if max_tokens is None:
        yield from rows
        return
    budget = 4 * max_tokens
    for row in rows:
        yield row
        budget -= len(row)
        if budget <= 0:
            return


def _write_shards(source: TextSource, config: DataConfig, tokenizer: Tokenizer, tmp: Path,
                  emit: Callable[[Event], None]) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    if source.separator == "eos" and eos is None:
        raise DataError(f"data.tokenizer: {config.tokenizer} has no end-of-text token to separate documents")
    encoder = RowEncoder(tokenizer, source.separator, eos, condition=config.condition,
                         legacy_regex=config.legacy_regex)
    stats = ShardStats(config.condition, config.legacy_regex, config.include_synthetic)
    unit = "documents" if source.separator == "eos" else "lines"
    splits_meta: dict[str, dict] = {}
    started = time.time()

    split_order = [s for s in ("val", "train", "test") if s in source.splits]
    split_order += [s for s in source.splits if s not in split_order]
    shared_train_iter: Iterator[str] | None = None
    if source.streaming and "val" not in source.splits:
        # Streamed source without val: the first documents become val, the rest train.
        shared_train_iter = source.splits["train"]()
        split_order = ["val", "train"]

    for split in split_order:
        if shared_train_iter is not None:
            rows = shared_train_iter
            budget = _stream_val_tokens(config) if split == "val" else config.max_tokens
        else:
            rows = source.splits[split]()
            budget = config.max_tokens if split == "train" else None
        total_rows = source.n_rows.get(split)
        synthetic = split == "train" and config.include_synthetic
        if synthetic:
            rows = itertools.chain([synthetic_drills()], rows)
            total_rows = None if total_rows is None else total_rows + 1
        path = tmp / f"{split}.bin"
        counts = ByteCountWriter(tmp / f"{split}.bytes")
        text_hash = hashlib.sha256()
        count, max_id, done_rows = 0, -1, 0
        leftover: list[str] = []
        last_emit = time.monotonic()
        with path.open("wb") as out, counts:
            for batch in batched(rows, _BATCH_ROWS, _BATCH_CHARS):
                encoded_batch = encoder.encode(batch)
                encoded, used = encoded_batch.encoded, len(batch)
                if budget is not None:
                    encoded, used = take_budget(encoded, budget - count)
                    leftover = batch[used:]
                if synthetic and done_rows == 0 and encoded:
                    stats.synthetic_tokens = len(encoded[0][0])
                stats.add(split, encoder, encoded_batch, encoded)
                for text in encoded_batch.texts[:used]:
                    text_hash.update(text.encode("utf-8", errors="surrogatepass"))
                if encoded:
                    flat = np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _ in encoded])
                    flat_bytes = np.concatenate([np.asarray(b, dtype=np.int64) for _, b in encoded])
                else:
                    flat = flat_bytes = np.zeros(0, dtype=np.int64)
                if flat.size:
                    max_id = max(max_id, int(flat.max()))
                    out.write(flat.astype(dtype).tobytes())
                    counts.write(flat_bytes)
                    count += int(flat.size)
                done_rows += used
                if time.monotonic() - last_emit >= PROGRESS_INTERVAL:
                    emit(DataProgress(stage=f"tokenize {split}", completed=done_rows, total=total_rows,
                                      unit=unit, tokens=count))
                    last_emit = time.monotonic()
                if budget is not None and count >= budget:
                    break
        # the last one: the split's rows are now known, so it reads as done
        emit(DataProgress(stage=f"tokenize {split}", completed=done_rows, total=done_rows, unit=unit, tokens=count))
        if shared_train_iter is not None and leftover:
            # Documents read past the val budget start the train split.
            shared_train_iter = itertools.chain(leftover, shared_train_iter)
        if count == 0:
            raise DataError(f"data.dataset: the {split} split of {source.description} has no tokens")
        splits_meta[split] = {"file": path.name, "tokens": count, "max_id": max_id,
                              "bytes_file": counts.path.name, "bytes_dtype": counts.dtype.name,
                              "n_bytes": counts.total, "text_sha256": text_hash.hexdigest()}

    meta = {
        "format": SHARD_FORMAT,
        "lmkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.time() - started, 3),
        "source": {"dataset": config.dataset, "description": source.description,
                   "fingerprint": source.fingerprint, "encoding": config.encoding},
        "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint(),
                      "vocab_size": tokenizer.vocab_size},
        "dtype": dtype.name,
        "splits": splits_meta,
    }
    if config.condition is not None:
        meta["stats"] = stats.as_dict()
    return meta


def _stream_val_tokens(config: DataConfig) -> int:
    if config.max_tokens is None:
        raise DataError("data.max_tokens: a streamed source needs a token budget")
    return max(1, min(int(config.max_tokens * config.val_fraction), 10_000_000))
