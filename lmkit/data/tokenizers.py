"""Tokenizers: ``char``, ``byte``, ``bpe``, ``gpt2`` and ``hf:NAME``.

Every tokenizer saves itself into a folder (``runs/NAME/tokenizer/``) with a
``tokenizer_meta.json`` naming its kind, so :func:`load_tokenizer` rebuilds it offline.

* ``char`` -- one id per character. For the arithmetic task it is the arithmetic experiment's
  vocabulary: ``<PAD>=0, <BOS>=1, <EOS>=2, <UNK>=3`` then the 31 characters of
  ``"0123456789+-*/()=ABCDEFabcdef ,"`` (35 ids). For text data the alphabet is every
  character of the training split, in code-point order, after the same 4 specials.
* ``byte`` -- ids 0..255 are the UTF-8 bytes, 256 is ``<|endoftext|>`` (257 ids).
* ``bpe`` -- byte-level BPE trained with Hugging Face ``tokenizers`` on the training
  split (``data.bpe_vocab_size`` ids, ``<|endoftext|>`` included).
* ``gpt2`` -- tiktoken's GPT-2 encoding (50,257 ids, ``<|endoftext|>`` = 50256). Offline
  it is built from OpenAI's ``encoder.json`` + ``vocab.bpe`` in ``$LMKIT_GPT2_DIR``.
* ``hf:NAME_OR_PATH`` -- a pretrained ``tokenizers`` tokenizer (``tokenizer.json`` path or
  hub name, e.g. ``hf:xlm-roberta-base``).
* ``gpt2+mul`` -- ``gpt2`` plus the domain-token experiment's 47 padding and 45 ``<MUL_a_b_c>``
  ids (50,349 ids) in the ``data.condition`` it is built for (:mod:`lmkit.data.tokenizer_mul`).

Every kind takes **added tokens** at fixed ids (:meth:`Tokenizer.add_tokens`), e.g. the
45 ``<MUL_a_b_c>`` tokens at 50304..50348 on GPT-2's vocabulary (ids 50257..50303 stay
unused). ``encode`` matches their strings in the text first (leftmost, longest first; the
text between goes through the base tokenizer, as Hugging Face's added vocabulary does),
``decode`` writes text tokens as their text and drops special ones, and they are saved,
reloaded, part of :meth:`~Tokenizer.fingerprint` and exported.

``encode_batch_with_bytes`` also gives every token the UTF-8 bytes of the original text it
covers (see :mod:`lmkit.data.token_bytes`): what bits per byte divides by.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmkit.data.token_bytes import bytes_from_char_ends, char_utf8_lengths, hf_piece_bytes
from lmkit.data.tokenizer_base import META_FILE, AddedToken, BytesEncoding, Tokenizer, _sha
from lmkit.errors import DataError, first_line

ENDOFTEXT = "<|endoftext|>"
CHAR_SPECIALS = ("<PAD>", "<BOS>", "<EOS>", "<UNK>")
#: The arithmetic experiment's character set (SimpleTokenizer in src/train.py): 31 symbols + 4 specials.
SEED_ALPHABET = "0123456789+-*/()=ABCDEFabcdef ,"
#: GPT-2's pre-tokenisation regex (tiktoken r50k_base / gpt2).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_VOCAB_SIZE = 50257

#: Vocabulary sizes known without loading anything (for parameter counts and doctor).
KNOWN_VOCAB_SIZES = {"byte": 257, "gpt2": GPT2_VOCAB_SIZE, "gpt2+mul": 50349, "hf:xlm-roberta-base": 250002}

__all__ = ["META_FILE", "AddedToken", "ByteTokenizer", "CharTokenizer", "GPT2Tokenizer", "HFTokenizer", "Tokenizer",
           "build_tokenizer", "load_tokenizer"]


class CharTokenizer(Tokenizer):
    """One id per character; the 4 specials first, then ``alphabet`` in order."""

    kind = "char"

    def __init__(self, alphabet: str = SEED_ALPHABET):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated characters")
        self.alphabet = alphabet
        self.itos = list(CHAR_SPECIALS) + list(alphabet)
        self.stoi = {ch: i for i, ch in enumerate(alphabet, start=len(CHAR_SPECIALS))}
        self.base_vocab_size = len(self.itos)
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        """Alphabet = every character in ``texts``, sorted by code point."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls("".join(sorted(chars)))

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        unk, stoi = self.unk_id, self.stoi
        return [[stoi.get(ch, unk) for ch in text] for text in texts]

    def _encode_batch_bytes(self, texts: list[str]) -> list[BytesEncoding]:
        # one token per character, <UNK> included: each counts the character it stands for
        return [(ids, char_utf8_lengths(text)) for ids, text in zip(self._encode_batch(texts), texts, strict=True)]

    def _decode(self, ids: list[int]) -> str:
        n_special = len(CHAR_SPECIALS)
        return "".join(self.itos[i] for i in ids if n_special <= i < self.base_vocab_size)

    def _has_token(self, text: str) -> bool:
        return text in self.stoi or text in CHAR_SPECIALS

    def base_piece_bytes(self) -> np.ndarray:
        return np.array([0] * len(CHAR_SPECIALS) + [len(ch.encode("utf-8")) for ch in self.alphabet], dtype=np.int64)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        return {"alphabet": self.alphabet, "specials": list(CHAR_SPECIALS)}

    def _fingerprint(self) -> str:
        return _sha("char", self.alphabet)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 and ``<|endoftext|>`` = 256."""

    kind = "byte"

    def __init__(self) -> None:
        self.base_vocab_size = 257
        self.eos_id = 256

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def _encode_batch_bytes(self, texts: list[str]) -> list[BytesEncoding]:
        return [(ids, np.ones(len(ids), dtype=np.int64)) for ids in self._encode_batch(texts)]

    def _decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def _has_token(self, text: str) -> bool:
        return text == ENDOFTEXT

    def base_piece_bytes(self) -> np.ndarray:
        return np.array([1] * 256 + [0], dtype=np.int64)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        return {}

    def _fingerprint(self) -> str:
        return _sha("byte")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer``: trained ``bpe`` or a pretrained ``hf:NAME``."""

    def __init__(self, backend: Any, kind: str, name: str | None = None):
        self.backend = backend
        self.kind = kind
        self.name = name
        self.base_vocab_size = backend.get_vocab_size(with_added_tokens=True)
        for token in (ENDOFTEXT, "</s>", "<eos>", "[SEP]"):
            tid = backend.token_to_id(token)
            if tid is not None:
                self.eos_id = tid
                break
        for token in ("<pad>", "[PAD]", "<PAD>"):
            tid = backend.token_to_id(token)
            if tid is not None:
                self.pad_id = tid
                break

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> HFTokenizer:
        """Train byte-level BPE (GPT-2 style pre-tokenisation) on ``texts``."""
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models, pre_tokenizers, trainers

        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[ENDOFTEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend, "bpe")

    @classmethod
    def pretrained(cls, name: str) -> HFTokenizer:
        """``hf:NAME``: a local ``tokenizer.json`` (or folder holding one) or a hub name.

        Raises:
            DataError: not found locally and not reachable on the hub.
        """
        from tokenizers import Tokenizer as Backend

        path = Path(name).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
        if path.is_file():
            return cls(Backend.from_file(str(path)), f"hf:{name}", name)
        try:
            backend = Backend.from_pretrained(name)
        except Exception as exc:  # network, auth or missing repo
            raise DataError(
                f"data.tokenizer: cannot load hf:{name} ({first_line(exc)}); offline, give a path "
                "to a tokenizer.json (hf:path/to/tokenizer.json) or use --tokenizer bpe/byte"
            ) from None
        return cls(backend, f"hf:{name}", name)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def _encode_batch_bytes(self, texts: list[str]) -> list[BytesEncoding]:
        if not texts:
            return []
        out: list[BytesEncoding] = []
        for text, enc in zip(texts, self.backend.encode_batch(texts, add_special_tokens=False), strict=True):
            ends = [end for _, end in enc.offsets]  # character offsets into ``text``
            out.append((enc.ids, bytes_from_char_ends(text, ends)))
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)

    def _has_token(self, text: str) -> bool:
        return self.backend.token_to_id(text) is not None

    def special_ids(self) -> frozenset[int]:
        backend_specials = {i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special}
        return super().special_ids() | backend_specials

    def base_piece_bytes(self) -> np.ndarray:
        if getattr(self, "_piece_bytes", None) is None:
            self._piece_bytes, _ = hf_piece_bytes(self.backend)
        return self._piece_bytes

    def _save_files(self, directory: Path) -> dict[str, Any]:
        self.backend.save(str(directory / "tokenizer.json"))
        return {"file": "tokenizer.json", "name": self.name}

    def _fingerprint(self) -> str:
        return _sha(self.kind, self.backend.to_str())


class GPT2Tokenizer(Tokenizer):
    """tiktoken's GPT-2 byte-level BPE (r50k): 50,257 ids, ``<|endoftext|>`` = 50256."""

    kind = "gpt2"

    def __init__(self, mergeable_ranks: dict[bytes, int]):
        import tiktoken

        try:
            from tiktoken_ext.openai_public import r50k_pat_str as pattern
        except ImportError:  # pragma: no cover - tiktoken without its extension module
            pattern = GPT2_PATTERN
        self.mergeable_ranks = mergeable_ranks
        self.eos_id = len(mergeable_ranks)
        self.enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,
            special_tokens={ENDOFTEXT: self.eos_id},
        )
        self.base_vocab_size = self.enc.n_vocab
        self._piece_bytes: np.ndarray | None = None

    @classmethod
    def from_files(cls, directory: Path) -> GPT2Tokenizer:
        """From OpenAI's ``encoder.json`` + ``vocab.bpe`` (or our saved ``gpt2.tiktoken``)."""
        import tiktoken.load

        saved = directory / "gpt2.tiktoken"
        if saved.is_file():
            return cls(_cached_ranks((saved,), lambda: tiktoken.load.load_tiktoken_bpe(str(saved))))
        files = (directory / "vocab.bpe", directory / "encoder.json")
        return cls(_cached_ranks(files, lambda: tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(files[0]), encoder_json_file=str(files[1]))))

    @classmethod
    def load_default(cls) -> GPT2Tokenizer:
        """From ``$LMKIT_GPT2_DIR`` if set, else tiktoken's own (cached or downloaded) copy.

        Raises:
            DataError: neither local files nor a network are available.
        """
        env = os.environ.get("LMKIT_GPT2_DIR")
        if env:
            directory = Path(env).expanduser()
            if not ((directory / "encoder.json").is_file() and (directory / "vocab.bpe").is_file()) and not (
                directory / "gpt2.tiktoken"
            ).is_file():
                raise DataError(
                    f"LMKIT_GPT2_DIR={env} holds neither encoder.json + vocab.bpe nor gpt2.tiktoken"
                )
            return cls.from_files(directory)
        try:
            import tiktoken

            enc = tiktoken.get_encoding("gpt2")
            return cls(enc._mergeable_ranks)  # noqa: SLF001 - tiktoken exposes no public accessor
        except Exception as exc:
            why = "no network" if _is_network_error(exc) else first_line(exc)
            raise DataError(
                f"data.tokenizer: the gpt2 tokenizer is not cached and could not be downloaded ({why}); "
                "set LMKIT_GPT2_DIR to a folder with OpenAI's encoder.json and vocab.bpe, "
                "or use --tokenizer bpe or byte"
            ) from None

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if sum(map(len, texts)) < 1000 * len(texts):  # short pieces: tiktoken's thread pool costs more than it saves
            return [self.enc.encode_ordinary(t) for t in texts]
        return self.enc.encode_ordinary_batch(texts)

    def _encode_batch_bytes(self, texts: list[str]) -> list[BytesEncoding]:
        # byte-level: every token's own raw bytes (a piece of a multi-byte character counts its part)
        table = self.base_piece_bytes()
        return [(ids, table[np.asarray(ids, dtype=np.int64)]) for ids in self._encode_batch(texts)]

    def _decode(self, ids: list[int]) -> str:
        return self.enc.decode([i for i in ids if i != self.eos_id])

    def _has_token(self, text: str) -> bool:
        return text == ENDOFTEXT or text.encode("utf-8") in self.mergeable_ranks

    def base_piece_bytes(self) -> np.ndarray:
        if self._piece_bytes is None:
            table = np.zeros(self.base_vocab_size, dtype=np.int64)
            for token, rank in self.mergeable_ranks.items():
                table[rank] = len(token)
            self._piece_bytes = table
        return self._piece_bytes

    def _save_files(self, directory: Path) -> dict[str, Any]:
        lines = (
            base64.b64encode(token).decode("ascii") + f" {rank}\n"
            for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        )
        (directory / "gpt2.tiktoken").write_text("".join(lines), encoding="ascii")
        return {"file": "gpt2.tiktoken"}

    def _fingerprint(self) -> str:
        return "gpt2-r50k"


_RANKS: dict[tuple, dict[bytes, int]] = {}


def _cached_ranks(files: tuple[Path, ...], read: Any) -> dict[bytes, int]:
    """``read()`` once per set of unchanged files (path, size, mtime): parsing GPT-2's merges
    takes most of a second, and a run reads them for its data, its evaluations and exports."""
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _RANKS:
        if len(_RANKS) >= 4:
            _RANKS.pop(next(iter(_RANKS)))
        _RANKS[key] = read()
    return _RANKS[key]


def _is_network_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ConnectionError, TimeoutError)) or "Connection" in type(seen).__name__:
            return True
        seen = seen.__cause__ or seen.__context__
    return False



def load_tokenizer(directory: Path) -> Tokenizer:
    """Rebuild a tokenizer saved by :meth:`Tokenizer.save`.

    Raises:
        DataError: missing or unreadable ``tokenizer_meta.json`` or files.
    """
    meta_path = directory / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        kind = meta["kind"]
    except (OSError, ValueError, KeyError):
        raise DataError(f"{meta_path}: missing or unreadable tokenizer description") from None
    tokenizer: Tokenizer
    try:
        if kind == "char":
            tokenizer = CharTokenizer(meta["alphabet"])
        elif kind == "byte":
            tokenizer = ByteTokenizer()
        elif kind == "gpt2":
            tokenizer = GPT2Tokenizer.from_files(directory)
        elif kind == "gpt2+mul":
            from lmkit.data.tokenizer_mul import load_mul_tokenizer

            return load_mul_tokenizer(directory, meta)
        elif kind == "bpe" or kind.startswith("hf:"):
            from tokenizers import Tokenizer as Backend

            backend = Backend.from_file(str(directory / meta.get("file", "tokenizer.json")))
            tokenizer = HFTokenizer(backend, kind, meta.get("name"))
        else:
            raise DataError(f"{meta_path}: unknown tokenizer kind {kind!r}")
        tokenizer.add_tokens(AddedToken(**t) for t in meta.get("added_tokens", []))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable files, bad JSON: one line
        raise DataError(f"{directory}: cannot rebuild the {kind} tokenizer ({first_line(exc)})") from None
    return tokenizer


def build_tokenizer(name: str, *, train_texts: Iterator[str] | None = None, bpe_vocab_size: int = 8192,
                    arithmetic: bool = False, condition: str | None = None) -> Tokenizer:
    """Make the tokenizer ``data.tokenizer`` names.

    Args:
        name: ``char``, ``byte``, ``bpe``, ``gpt2``, ``gpt2+mul`` or ``hf:NAME_OR_PATH``.
        train_texts: the training split's texts (needed by ``bpe`` and text ``char``).
        bpe_vocab_size: vocabulary size for ``bpe``.
        arithmetic: use the arithmetic experiment's fixed character set for ``char``.
        condition: ``data.condition`` (``baseline`` or ``mul_tokens``): required by ``gpt2+mul``
            and by no other kind.

    Raises:
        DataError: the tokenizer cannot be built (no files, no network, no texts), or
            ``condition`` is missing for ``gpt2+mul`` or given for another kind.
    """
    if name == "gpt2+mul":
        from lmkit.data.tokenizer_mul import GPT2MulTokenizer, check_condition

        check_condition(condition)
        return GPT2MulTokenizer.from_gpt2(GPT2Tokenizer.load_default(), condition)
    if condition is not None:
        raise DataError(f"data.condition {condition} needs data.tokenizer gpt2+mul (the 50,349-id vocabulary "
                        f"of both conditions), not {name}; set --set data.tokenizer=gpt2+mul")
    if name == "char":
        if arithmetic or train_texts is None:
            return CharTokenizer(SEED_ALPHABET)
        return CharTokenizer.from_texts(train_texts)
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer.load_default()
    if name == "bpe":
        if train_texts is None:
            raise DataError("data.tokenizer: bpe must be trained on a text data set")
        return HFTokenizer.train_bpe(train_texts, bpe_vocab_size)
    if name.startswith("hf:"):
        return HFTokenizer.pretrained(name[3:])
    raise DataError(f"data.tokenizer: unknown tokenizer {name!r}")
