"""The tokenizer interface (:class:`Tokenizer`) and added tokens (:class:`AddedToken`).

The kinds (``char``, ``byte``, ``bpe``, ``gpt2``, ``hf:``) are in :mod:`lmkit.data.tokenizers`.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmkit.errors import DataError

META_FILE = "tokenizer_meta.json"


@dataclass(frozen=True)
class AddedToken:
    """A token added to a tokenizer at a fixed id.

    Attributes:
        text: the string it stands for; ``encode`` turns every occurrence into ``id``.
        id: its id, at or above the base vocabulary (ids in between stay unused).
        special: it stands for no text (a separator, a role marker): ``decode`` drops it
            and bits per byte counts it 0 bytes when it was not in the text.
    """

    text: str
    id: int
    special: bool = False


BytesEncoding = tuple[list[int], np.ndarray]
#: Part of a text to encode: text for the base tokenizer, or ``(id, text)``: one token standing for ``text``.
Segment = str | tuple[int, str]


class Tokenizer(ABC):
    """Text <-> token ids. ``vocab_size`` is the number of ids (max id + 1), added tokens included.

    Subclasses set ``base_vocab_size`` and implement ``_encode_batch``,
    ``_encode_batch_bytes``, ``_decode``, ``_save_files``, ``_fingerprint``,
    ``base_piece_bytes`` and ``_has_token``.
    """

    kind: str
    base_vocab_size: int
    eos_id: int | None = None
    bos_id: int | None = None
    pad_id: int | None = None
    added_tokens: tuple[AddedToken, ...] = ()
    _added_by_id: dict[int, AddedToken] = {}  # noqa: RUF012 - replaced, never mutated
    _added_by_text: dict[str, int] = {}  # noqa: RUF012 - replaced, never mutated
    _added_pattern: re.Pattern[str] | None = None

    @property
    def vocab_size(self) -> int:
        """Ids in use: the base vocabulary, then any unused ids and the added tokens."""
        if not self.added_tokens:
            return self.base_vocab_size
        return max(self.base_vocab_size, self.added_tokens[-1].id + 1)  # sorted by id

    # ---------------------------------------------------------------- added tokens

    def add_tokens(self, tokens: Iterable[AddedToken | tuple[str, int] | tuple[str, int, bool]]) -> None:
        """Add tokens at fixed ids (see :class:`AddedToken`); may be called more than once.

        Raises:
            DataError: an empty text, an id below the base vocabulary or already added,
                or a text that is already a token.
        """
        new = [t if isinstance(t, AddedToken) else AddedToken(*t) for t in tokens]
        by_id = dict(self._added_by_id)
        texts = {t.text for t in self.added_tokens}
        for token in new:
            if not token.text:
                raise DataError(f"added token id {token.id}: the text is empty")
            if token.id < self.base_vocab_size:
                raise DataError(f"added token {token.text!r}: id {token.id} is taken by the {self.kind} "
                                f"vocabulary (ids 0..{self.base_vocab_size - 1}); use {self.base_vocab_size} or more")
            if token.id in by_id:
                raise DataError(f"added token {token.text!r}: id {token.id} is already {by_id[token.id].text!r}")
            if token.text in texts or self._has_token(token.text):
                raise DataError(f"added token {token.text!r}: already a token of the {self.kind} tokenizer")
            by_id[token.id] = token
            texts.add(token.text)
        self.added_tokens = tuple(sorted(by_id.values(), key=lambda t: t.id))
        self._added_by_id = by_id
        self._added_by_text = {t.text: t.id for t in self.added_tokens}
        skipped = self._unmatched_texts()
        alternatives = sorted((t for t in texts if t not in skipped), key=lambda t: (-len(t), t))  # longest first
        self._added_pattern = re.compile("|".join(re.escape(t) for t in alternatives)) if alternatives else None

    def _unmatched_texts(self) -> frozenset[str]:
        """Added-token texts that :meth:`encode` never matches: they stay text for the base
        tokenizer, while :meth:`decode` still writes their id as the text. None by default;
        ``gpt2+mul`` uses it for its padding strings and, in the baseline condition, its mul strings."""
        return frozenset()

    def added_segments(self, text: str) -> list[Segment]:
        """``text`` cut into base-tokenizer text and ``(id, text)`` occurrences of the added
        tokens :meth:`encode` matches (the form :meth:`encode_segments_with_bytes` takes)."""
        return self._segments(text) if self.added_tokens else ([text] if text else [])

    def _segments(self, text: str) -> list[Segment]:
        """``text`` cut into base-tokenizer text and ``(id, text)`` added-token occurrences."""
        if self._added_pattern is None:
            return [text] if text else []
        by_text = self._added_by_text
        out: list[Segment] = []
        pos = 0
        for match in self._added_pattern.finditer(text):
            if match.start() > pos:
                out.append(text[pos : match.start()])
            out.append((by_text[match.group()], match.group()))
            pos = match.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def special_ids(self) -> frozenset[int]:
        """Ids that stand for no text: end/begin/padding tokens, special added tokens."""
        ids = {i for i in (self.eos_id, self.bos_id, self.pad_id) if i is not None}
        ids |= {t.id for t in self.added_tokens if t.special}
        return frozenset(ids)

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with no special tokens added (added tokens' strings become their ids)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text (parallel where the backend supports it)."""
        if not self.added_tokens:
            return self._encode_batch(list(texts))
        return [ids for ids, _ in self.encode_batch_with_bytes(texts)]

    def encode_batch_plain(self, texts: Sequence[str]) -> list[list[int]]:
        """Base-tokenizer ids of each text, no added token matched: how the same text
        tokenizes without them (e.g. the baseline of a text-rewriting condition)."""
        return self._encode_batch(list(texts))

    def encode_with_bytes(self, text: str) -> BytesEncoding:
        """``(ids, n_bytes)``: the ids of ``text`` and, per token, the UTF-8 bytes of the text
        from the previous token's end to its own (``int64`` array, same length; adds up
        to ``len(text.encode())`` when there is a token)."""
        return self.encode_batch_with_bytes([text])[0]

    def encode_batch_with_bytes(self, texts: Sequence[str]) -> list[BytesEncoding]:
        """:meth:`encode_with_bytes` of each text."""
        texts = list(texts)
        if not self.added_tokens:
            return self._encode_batch_bytes(texts)
        return self.encode_segments_with_bytes([self._segments(t) for t in texts])

    def encode_segments_with_bytes(self, rows: Sequence[Sequence[Segment]]) -> list[BytesEncoding]:
        """``(ids, n_bytes)`` of rows given as segments: a ``str`` goes through the base
        tokenizer; an ``(id, text)`` pair is the single token ``id`` standing for ``text``
        (its byte count is ``text``'s, e.g. ``(50342, "6*9=54")`` for ``<MUL_6_9_54>``
        replacing that text). What a text-rewriting condition uses so that bits per byte
        still divides by the original text's bytes.
        """
        pieces = [seg for row in rows for seg in row if isinstance(seg, str)]
        encoded = iter(self._encode_batch_bytes(pieces))
        out: list[BytesEncoding] = []
        for row in rows:
            ids: list[int] = []
            counts: list[np.ndarray] = []
            pending = 0  # bytes of text that gave no token: carried to the next token
            for seg in row:
                if not isinstance(seg, str):
                    token_id, text = seg
                    ids.append(int(token_id))
                    counts.append(np.array([len(text.encode("utf-8", errors="surrogatepass")) + pending],
                                           dtype=np.int64))
                    pending = 0
                    continue
                seg_ids, seg_bytes = next(encoded)
                if not seg_ids:
                    pending += len(seg.encode("utf-8", errors="surrogatepass"))
                    continue
                seg_bytes = np.array(seg_bytes, dtype=np.int64)
                seg_bytes[0] += pending
                pending = 0
                ids.extend(seg_ids)
                counts.append(seg_bytes)
            n_bytes = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
            if pending and len(n_bytes):
                n_bytes[-1] += pending
            out.append((ids, n_bytes))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens and unused ids are dropped."""
        ids = [int(i) for i in ids]
        if not self.added_tokens:
            return self._decode([i for i in ids if 0 <= i < self.base_vocab_size])
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            token = self._added_by_id.get(i)
            if token is None:
                if 0 <= i < self.base_vocab_size:
                    run.append(i)
                continue
            if run:
                parts.append(self._decode(run))
                run = []
            if not token.special:
                parts.append(token.text)
        if run:
            parts.append(self._decode(run))
        return "".join(parts)

    @abstractmethod
    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Base-vocabulary ids of each text."""

    @abstractmethod
    def _encode_batch_bytes(self, texts: list[str]) -> list[BytesEncoding]:
        """Base-vocabulary ids of each text and each token's byte count."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Text of base-vocabulary ids; special tokens dropped."""

    @abstractmethod
    def _has_token(self, text: str) -> bool:
        """``text`` is already one token of the base vocabulary."""

    @abstractmethod
    def base_piece_bytes(self) -> np.ndarray:
        """UTF-8 bytes of every base-vocabulary id (0 for special tokens), ``int64`` ``(base_vocab_size,)``."""

    # ---------------------------------------------------------------- persistence

    @abstractmethod
    def _save_files(self, directory: Path) -> dict[str, Any]:
        """Write the files needed to rebuild; return extra fields for the meta file."""

    def save(self, directory: Path) -> None:
        """Write everything needed to rebuild this tokenizer offline into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "bos_id": self.bos_id, "pad_id": self.pad_id}
        meta.update(self._save_files(directory))
        if self.added_tokens:
            meta["base_vocab_size"] = self.base_vocab_size
            meta["added_tokens"] = [asdict(t) for t in self.added_tokens]
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    def fingerprint(self) -> str:
        """A short hash of the vocabulary (added tokens included), so caches notice a different tokenizer."""
        base = self._fingerprint()
        if not self.added_tokens:
            return base
        return _sha(base, json.dumps([asdict(t) for t in self.added_tokens], sort_keys=True))

    @abstractmethod
    def _fingerprint(self) -> str:
        """The base vocabulary's hash."""


def _sha(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8") if isinstance(part, str) else part)
    return h.hexdigest()[:16]
