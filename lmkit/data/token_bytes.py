"""How many bytes of text each token stands for (the denominator of bits per byte).

Two ways to count, in order of preference:

* **per occurrence** (:func:`bytes_from_char_ends`, used by every tokenizer's
  ``encode_batch_with_bytes`` when the token shards are built): token ``i`` of a text is
  given the UTF-8 bytes of the original text from the end of token ``i - 1`` to its own
  end (the first token from the start of the text, the last one to the end of the
  text), so a text's counts always add up to its UTF-8 length. For SentencePiece-style
  ``Metaspace`` tokenizers the ``▁`` of ``▁the`` is the space before it when there is
  one and nothing at the start of a line; for a token whose text varies per occurrence
  (an ``<UNK>``, an added token) it is what the token replaced.
* **per id** (:func:`token_byte_table`): one number per vocabulary id, the fallback for
  token shards written before the per-occurrence counts existed. Special tokens count
  0 bytes; byte-level pieces their raw bytes; ``▁`` counts as a space; added text
  tokens the bytes of their text.

Also here: GPT-2's ``bytes_to_unicode`` (the byte-level alphabet of ``gpt2``/``bpe``).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lmkit.data.tokenizers import Tokenizer

#: Widest per-token byte count a shard stores in ``uint8``; wider ones switch it to ``uint16``.
UINT8_MAX = 255
#: Counts above this are clipped (a single token covering 64 KiB of text: pathological).
UINT16_MAX = 65535


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (Radford et al. 2019,
    ``encoder.py`` of openai/gpt-2): 256 entries."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """:func:`bytes_to_unicode` inverted: printable stand-in character -> byte."""
    return {ch: b for b, ch in bytes_to_unicode().items()}


def utf8_prefix_lengths(text: str) -> np.ndarray:
    """UTF-8 length of ``text[:i]`` for ``i = 0..len(text)``: ``int64`` array ``(len(text) + 1,)``.

    Lone surrogates count 3 bytes (as ``surrogatepass`` encodes them).
    """
    n = len(text)
    if text.isascii():
        return np.arange(n + 1, dtype=np.int64)
    cps = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    lengths = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    out = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def char_utf8_lengths(text: str) -> np.ndarray:
    """UTF-8 length of every character of ``text``: ``int64`` array ``(len(text),)``."""
    return np.diff(utf8_prefix_lengths(text))


def bytes_from_char_ends(text: str, ends: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-token UTF-8 byte counts from the tokens' end offsets (in characters) in ``text``.

    Token ``i`` gets the bytes of ``text[max(ends[:i]) : max(ends[:i+1])]``; the last token
    also gets whatever follows the last end (text a normaliser dropped), so the counts add
    up to ``len(text.encode("utf-8"))`` whenever there is at least one token. Overlapping
    offsets (byte-level pieces of one character) give the first piece the whole character.

    Returns:
        ``int64`` array ``(len(ends),)``.
    """
    n = len(ends)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    prefix = utf8_prefix_lengths(text)
    stops = np.maximum.accumulate(np.clip(np.asarray(ends, dtype=np.int64), 0, len(text)))
    cum = prefix[stops]
    cum[-1] = prefix[-1]
    return np.diff(cum, prepend=0)


class ByteCountWriter:
    """Writes a shard's per-token byte counts to ``path`` as raw ``uint8``; the first count
    above 255 rewrites what was written as ``uint16`` and continues so (counts above 65,535
    are clipped). ``dtype`` is what the file holds, ``total`` the sum of the counts."""

    def __init__(self, path: Path):
        self.path = path
        self.dtype = np.dtype(np.uint8)
        self.total = 0
        self._file = None

    def __enter__(self) -> ByteCountWriter:
        self._file = self.path.open("wb")
        return self

    def __exit__(self, *exc) -> None:
        assert self._file is not None
        self._file.close()

    def write(self, counts: np.ndarray) -> None:
        assert self._file is not None
        self.total += int(counts.sum())
        if self.dtype == np.uint8 and counts.size and int(counts.max()) > UINT8_MAX:
            self._file.close()
            widened = np.fromfile(self.path, dtype=np.uint8).astype(np.uint16)
            self.dtype = np.dtype(np.uint16)
            self._file = self.path.open("wb")
            self._file.write(widened.tobytes())
        self._file.write(np.clip(counts, 0, UINT16_MAX).astype(self.dtype).tobytes())


# --------------------------------------------------------------------------------------
# Per-id table (fallback for shards without per-token counts)
# --------------------------------------------------------------------------------------

_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _find_components(node: Any, kind: str) -> list[dict]:
    """Every ``{"type": kind, ...}`` object inside a ``tokenizer.json`` fragment."""
    found: list[dict] = []
    if isinstance(node, dict):
        if node.get("type") == kind:
            found.append(node)
        for value in node.values():
            found += _find_components(value, kind)
    elif isinstance(node, list):
        for value in node:
            found += _find_components(value, kind)
    return found


def hf_piece_bytes(backend: Any) -> tuple[np.ndarray, set[int]]:
    """Per-id byte counts of a ``tokenizers.Tokenizer``'s pieces and its special ids.

    Byte-level pieces (decoder ``ByteLevel``) count their raw bytes; ``Metaspace`` pieces
    count ``▁`` as one space; byte-fallback pieces ``<0xNN>`` count 1; anything else the
    UTF-8 length of ``decode([id])``. Special added tokens count 0.
    """
    try:
        spec = json.loads(backend.to_str())
    except ValueError:  # pragma: no cover - a backend always serialises
        spec = {}
    byte_level = bool(_find_components(spec.get("decoder"), "ByteLevel"))
    metaspace = _find_components([spec.get("pre_tokenizer"), spec.get("decoder")], "Metaspace")
    replacement = metaspace[0].get("replacement", "▁") if metaspace else None
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    specials = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    alphabet = byte_level_alphabet()
    n = backend.get_vocab_size(with_added_tokens=True)
    table = np.zeros(n, dtype=np.int64)
    for i in range(n):
        if i in specials:
            continue
        piece = backend.id_to_token(i)
        if piece is None:
            continue
        if byte_level and all(ch in alphabet for ch in piece):
            table[i] = len(piece)
        elif byte_fallback and _BYTE_FALLBACK.fullmatch(piece):
            table[i] = 1
        elif replacement is not None:
            table[i] = len(piece.replace(replacement, " ").encode("utf-8"))
        else:
            table[i] = len(backend.decode([i], skip_special_tokens=False).encode("utf-8"))
    return table, specials


def token_byte_table(tokenizer: Tokenizer, size: int | None = None) -> np.ndarray:
    """UTF-8 bytes per token id (the corrected per-id fallback; see the module docstring).

    Args:
        tokenizer: the run's tokenizer.
        size: length of the table (``model.vocab_size``, which may exceed the tokenizer's
            vocabulary; extra ids get 0). Default: ``tokenizer.vocab_size``.

    Returns:
        ``int64`` array ``(max(size, tokenizer.vocab_size),)``: 0 for special tokens and
        unused ids, the text's bytes for added text tokens.
    """
    n = max(tokenizer.vocab_size, size or 0)
    table = np.zeros(n, dtype=np.int64)
    base = tokenizer.base_piece_bytes()
    table[: len(base)] = base
    for token in tokenizer.added_tokens:
        table[token.id] = 0 if token.special else len(token.text.encode("utf-8"))
    for i in tokenizer.special_ids():
        if i < n:
            table[i] = 0
    return table


def special_id_mask(tokenizer: Tokenizer, size: int | None = None) -> np.ndarray:
    """``True`` for ids that stand for no text: special tokens, unused ids (between the
    vocabulary and the added tokens, or beyond the tokenizer up to ``size``).

    Returns:
        ``bool`` array ``(max(size, tokenizer.vocab_size),)``.
    """
    n = max(tokenizer.vocab_size, size or 0)
    mask = np.ones(n, dtype=bool)
    mask[: tokenizer.base_vocab_size] = False
    for token in tokenizer.added_tokens:
        mask[token.id] = token.special
    for i in tokenizer.special_ids():
        if i < n:
            mask[i] = True
    return mask
