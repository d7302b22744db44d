"""Token shards: text tokenised once into memory-mapped arrays, reused while unchanged.

Layout of one cache entry (``$LMKIT_CACHE_DIR`` or ``~/.cache/lmkit``, then
``tokens/<name>-<key>/``)::

    meta.json        tokenizer kind + fingerprint, vocab_size, dtype, per split: tokens,
                     max id, file; the source's fingerprint; lmkit version
    train.bin        raw uint16 (vocab <= 65,536) or uint32 token ids, no header
    val.bin
    test.bin         when the source has a test split
    tokenizer/       the tokenizer that made them (trained BPE / text char alphabets)

``key`` hashes the source fingerprint (file contents or hub fingerprint) and every
setting that changes the ids, so editing a file or changing the tokenizer rebuilds.
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
from lmkit.data.sources import TextSource
from lmkit.data.tokenizers import Tokenizer, build_tokenizer, load_tokenizer
from lmkit.errors import DataError
from lmkit.events import DataProgress, Event

SHARD_FORMAT = 1
_BATCH_ROWS = 2048


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


def cache_key(source: TextSource, config: DataConfig) -> str:
    parts = [
        f"format={SHARD_FORMAT}",
        f"source={source.fingerprint}",
        f"tokenizer={config.tokenizer}",
        f"bpe={config.bpe_vocab_size if config.tokenizer == 'bpe' else '-'}",
        f"max_tokens={config.max_tokens}",
        f"val_fraction={config.val_fraction if source.streaming else '-'}",
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _slug(text: str) -> str:
    base = Path(text).name if not text.startswith("hf:") else text[3:]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:40] or "data"


def prepare_shards(source: TextSource, config: DataConfig, emit: Callable[[Event], None]) -> tuple[TokenShards, Tokenizer]:
    """Tokenise ``source`` into shards, or reuse the cache entry made from the same input.

    Raises:
        DataError: a split with no tokens, or an unusable cache folder.
    """
    root = cache_root(config) / "tokens"
    directory = root / f"{_slug(config.dataset)}-{cache_key(source, config)}"
    shards = _load_existing(directory)
    if shards is not None:
        tokenizer_dir = directory / "tokenizer"
        tokenizer = load_tokenizer(tokenizer_dir)
        return shards, tokenizer

    tokenizer = _make_tokenizer(source, config, emit)
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
    return shards


def _make_tokenizer(source: TextSource, config: DataConfig, emit: Callable[[Event], None]) -> Tokenizer:
    needs_training = config.tokenizer in ("bpe", "char")
    if not needs_training:
        return build_tokenizer(config.tokenizer)
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
        path = tmp / f"{split}.bin"
        count, max_id, done_rows = 0, -1, 0
        leftover: list[str] = []
        with path.open("wb") as out:
            for batch in _batched(rows, _BATCH_ROWS):
                encoded = _encode_rows(tokenizer, batch, source.separator, eos)
                if budget is not None:
                    encoded, used = _take_budget(encoded, budget - count)
                    leftover = batch[used:]
                flat = (np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded])
                        if encoded else np.zeros(0, dtype=np.int64))
                if flat.size:
                    max_id = max(max_id, int(flat.max()))
                    out.write(flat.astype(dtype).tobytes())
                    count += int(flat.size)
                done_rows += len(batch)
                emit(DataProgress(stage=f"tokenize {split}", completed=done_rows if budget is None else count,
                                  total=total_rows if budget is None else budget,
                                  unit="rows" if budget is None else "tokens"))
                if budget is not None and count >= budget:
                    break
        if shared_train_iter is not None and leftover:
            # Documents read past the val budget start the train split.
            shared_train_iter = itertools.chain(leftover, shared_train_iter)
        if count == 0:
            raise DataError(f"data.dataset: the {split} split of {source.description} has no tokens")
        splits_meta[split] = {"file": path.name, "tokens": count, "max_id": max_id}

    return {
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


def _encode_rows(tokenizer: Tokenizer, rows: list[str], separator: str, eos: int | None) -> list[list[int]]:
    """Ids per row: lines keep (or get) their newline; documents are followed by EOS."""
    if separator == "newline":
        texts = [t if t.endswith("\n") else t + "\n" for t in rows]
        return tokenizer.encode_batch(texts) if texts else []
    return [ids + [eos] for ids in tokenizer.encode_batch(rows)]


def _take_budget(encoded: list[list[int]], remaining: int) -> tuple[list[list[int]], int]:
    """The rows' ids that fit in ``remaining`` tokens (the last one cut) and how many rows were used."""
    taken: list[list[int]] = []
    for used, ids in enumerate(encoded):
        if remaining <= 0:
            return taken, used
        taken.append(ids[:remaining])
        remaining -= len(ids)
    return taken, len(encoded)


def _stream_val_tokens(config: DataConfig) -> int:
    if config.max_tokens is None:
        raise DataError("data.max_tokens: a streamed source needs a token budget")
    return max(1, min(int(config.max_tokens * config.val_fraction), 10_000_000))


def _batched(rows: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
