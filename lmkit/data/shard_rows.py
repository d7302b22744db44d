"""Rows of text -> token ids and per-token bytes for :mod:`lmkit.data.shards`, and the data stats.

Separators: lines keep (or get) their newline; documents get one ``<|endoftext|>`` (0 bytes)
after them, or, when ``data.condition`` is set, before them (``[EOT] + tokens``, the layout of the
domain-token experiment's FineWeb-Edu shards).

In the ``mul_tokens`` condition each row goes through
:func:`~lmkit.data.mul_tokens.inject_segments` and
:meth:`~lmkit.data.tokenizer_base.Tokenizer.encode_segments_with_bytes`, so every mul token
carries the UTF-8 bytes of the exact original text it replaced (``"6*9=54"`` 6 bytes,
``"6 * 9 = 54"`` 10): a row's counts add up to the original text's UTF-8 length, and bits per
byte divides by the un-injected text in both conditions.

:class:`ShardStats` counts what the experiment compared (``compare_results.py``): total / train /
val tokens, documents, mul tokens and their ratio, and the compression, the tokens the same text
gives without injection (GPT-2 BPE of the original text of every row that had a mul token,
counted in the same pass) minus the tokens written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmkit.data.mul_tokens import GPT2_BASE_VOCAB, MUL_VOCAB_SIZE, count_mul_ids, inject_segments
from lmkit.data.tokenizer_base import Segment, Tokenizer

Encoded = list[tuple[list[int], np.ndarray]]


@dataclass
class RowBatch:
    """One batch of rows, encoded.

    Attributes:
        texts: the rows' original texts as tokenized (lines with their newline).
        encoded: per row, ``(ids, n_bytes)`` with the separator included.
        injected: per row, whether it holds a mul token (only those differ from the baseline).
    """

    texts: list[str]
    encoded: Encoded
    injected: list[bool]


class RowEncoder:
    """Encodes rows for a shard split.

    Args:
        tokenizer: the run's tokenizer.
        separator: ``"newline"`` (rows are lines) or ``"eos"`` (rows are documents).
        eos: the end-of-text id (needed for ``"eos"``).
        condition: ``data.condition`` (``None``, ``"baseline"`` or ``"mul_tokens"``).
        legacy_regex: ``data.legacy_regex`` (the injection's unguarded pattern).
    """

    def __init__(self, tokenizer: Tokenizer, separator: str, eos: int | None, *, condition: str | None = None,
                 legacy_regex: bool = False):
        self.tokenizer = tokenizer
        self.separator = separator
        self.eos = eos
        self.inject = condition == "mul_tokens"
        self.eos_first = condition is not None
        self.legacy_regex = legacy_regex
        # tokens added on top of gpt2+mul's own (its padding is never matched, its mul strings
        # are found by inject_segments): only they need another pass over the text pieces
        self._extra_added = any(not (GPT2_BASE_VOCAB <= t.id < MUL_VOCAB_SIZE) for t in tokenizer.added_tokens)

    def encode(self, rows: list[str]) -> RowBatch:
        """The rows' texts, ``(ids, n_bytes)`` and whether each was injected."""
        texts = [t if t.endswith("\n") else t + "\n" for t in rows] if self.separator == "newline" else rows
        if not texts:
            return RowBatch([], [], [])
        if self.inject:
            segments = [self._segments(t) for t in texts]
            injected = [any(not isinstance(s, str) for s in segs) for segs in segments]
            encoded = self.tokenizer.encode_segments_with_bytes(segments)
        else:
            injected = [False] * len(texts)
            encoded = self.tokenizer.encode_batch_with_bytes(texts)
        if self.separator != "newline":
            assert self.eos is not None
            zero = np.zeros(1, dtype=np.int64)
            if self.eos_first:
                encoded = [([self.eos, *ids], np.concatenate([zero, np.asarray(b, dtype=np.int64)])) for ids, b in encoded]
            else:
                encoded = [([*ids, self.eos], np.concatenate([np.asarray(b, dtype=np.int64), zero])) for ids, b in encoded]
        return RowBatch(texts, encoded, injected)

    def _segments(self, text: str) -> list[Segment]:
        out: list[Segment] = []
        segments = inject_segments(text, legacy_regex=self.legacy_regex)
        if not self._extra_added:
            return segments
        for seg in segments:
            out.extend(self.tokenizer.added_segments(seg) if isinstance(seg, str) else [seg])
        return out

    def baseline_tokens(self, texts: list[str], kept_bytes: list[int | None]) -> list[int]:
        """Tokens of each text (or of its first ``kept_bytes`` UTF-8 bytes) without injection,
        separators not counted."""
        pieces = []
        for text, kept in zip(texts, kept_bytes, strict=True):
            if kept is not None:
                text = text.encode("utf-8", errors="surrogatepass")[:kept].decode("utf-8", errors="ignore")
            pieces.append(text)
        return [len(ids) for ids in self.tokenizer.encode_batch_plain(pieces)] if pieces else []

    def separators(self, ids: list[int], whole: bool) -> int:
        """How many of a row's (kept) ``ids`` are the separator."""
        if self.separator == "newline" or not ids:
            return 0
        return 1 if (self.eos_first or whole) else 0


@dataclass
class ShardStats:
    """Data stats of one cache entry, counted while the shards are written."""

    condition: str | None
    legacy_regex: bool
    include_synthetic: bool
    tokens: dict[str, int] = field(default_factory=dict)
    documents: dict[str, int] = field(default_factory=dict)
    mul_tokens: dict[str, int] = field(default_factory=dict)
    tokens_saved: int = 0
    synthetic_tokens: int = 0

    def add(self, split: str, encoder: RowEncoder, batch: RowBatch, encoded: Encoded) -> None:
        """Count the rows of ``batch`` that were kept (``encoded``: the first rows, the last maybe cut)."""
        self.documents[split] = self.documents.get(split, 0) + len(encoded)
        self.tokens[split] = self.tokens.get(split, 0) + sum(len(ids) for ids, _ in encoded)
        if not encoded:
            return
        self.mul_tokens[split] = self.mul_tokens.get(split, 0) + sum(count_mul_ids(ids) for ids, _ in encoded)
        rows = [i for i in range(len(encoded)) if batch.injected[i]]
        if not rows:
            return
        whole = [len(encoded[i][0]) == len(batch.encoded[i][0]) for i in rows]
        kept = [None if w else int(np.asarray(encoded[i][1]).sum()) for i, w in zip(rows, whole, strict=True)]
        baseline = encoder.baseline_tokens([batch.texts[i] for i in rows], kept)
        for i, w, base in zip(rows, whole, baseline, strict=True):
            ids = encoded[i][0]
            self.tokens_saved += base - (len(ids) - encoder.separators(ids, w))

    def as_dict(self) -> dict[str, Any]:
        """The stats as stored in ``meta.json`` (``TokenShards.stats``)."""
        total = sum(self.tokens.values())
        mul = sum(self.mul_tokens.values())
        baseline = total + self.tokens_saved
        out: dict[str, Any] = {
            "condition": self.condition,
            "legacy_regex": self.legacy_regex,
            "include_synthetic": self.include_synthetic,
            "total_tokens": total,
        }
        out.update({f"{split}_tokens": n for split, n in self.tokens.items()})
        out.update({
            "total_documents": sum(self.documents.values()),
            "mul_tokens": mul,
            "mul_token_ratio": mul / total if total else 0.0,
            "mul_tokens_by_split": dict(self.mul_tokens),
            "baseline_tokens": baseline,
            "tokens_saved": self.tokens_saved,
            "token_reduction": self.tokens_saved / baseline if baseline else 0.0,
            "synthetic_tokens": self.synthetic_tokens,
        })
        return out


def take_budget(encoded: Encoded, remaining: int) -> tuple[Encoded, int]:
    """The rows' ids that fit in ``remaining`` tokens (the last one cut) and how many rows were used."""
    taken: Encoded = []
    for used, (ids, n_bytes) in enumerate(encoded):
        if remaining <= 0:
            return taken, used
        taken.append((ids[:remaining], n_bytes[:remaining]))
        remaining -= len(ids)
    return taken, len(encoded)


def batched(rows: Iterator[str], size: int, max_chars: int | None = None) -> Iterator[list[str]]:
    """``rows`` in lists of ``size`` rows, or fewer once they hold ``max_chars`` characters."""
    batch: list[str] = []
    chars = 0
    for row in rows:
        batch.append(row)
        chars += len(row)
        if len(batch) >= size or (max_chars is not None and chars >= max_chars):
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


__all__ = ["Encoded", "RowBatch", "RowEncoder", "ShardStats", "batched", "take_budget"]
