"""``gpt2+mul``: GPT-2 BPE with the domain-token experiment's 47 padding and 45 mul-token ids.

Ids (see :mod:`lmkit.data.mul_tokens`): 0..50256 GPT-2, 50257..50303 the padding strings
``<|padding_i|>`` (special: ``decode`` drops them, 0 bytes), 50304..50348 the ``<MUL_a_b_c>``
strings; ``vocab_size`` 50,349 in both conditions, so both models have the same architecture.

The **condition** decides what ``encode`` does with a mul string found in the text:

* ``mul_tokens``: it is its id (atomically, as the experiment's tiktoken-side encoder and its
  Hugging Face tokenizer with ``add_tokens`` both do);
* ``baseline``: it is plain text, split by GPT-2 BPE like any other text (the baseline model was
  trained so); ``decode`` of a mul id still writes its string.

The padding strings are never matched in text. The condition is saved with the tokenizer
(``tokenizer_meta.json``) and is part of :meth:`fingerprint`, so the two conditions' caches and
runs are never mixed up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmkit.data.mul_tokens import CONDITIONS, PADDING_IDS, inject_segments, mul_strings, padding_token_string
from lmkit.data.tokenizer_base import AddedToken, BytesEncoding
from lmkit.data.tokenizers import GPT2Tokenizer
from lmkit.errors import DataError

KIND = "gpt2+mul"


def builtin_tokens() -> list[AddedToken]:
    """The 47 special padding tokens then the 45 mul tokens, in id order (50257..50348)."""
    padding = [AddedToken(padding_token_string(i), token_id, special=True) for i, token_id in enumerate(PADDING_IDS)]
    return padding + [AddedToken(text, token_id) for text, token_id in mul_strings().items()]


def check_condition(condition: str | None) -> str:
    """``condition`` if it is one of :data:`~lmkit.data.mul_tokens.CONDITIONS`.

    Raises:
        DataError: ``None`` or another value (the message names the setting).
    """
    if condition not in CONDITIONS:
        got = "not set" if condition is None else f"{condition!r}"
        raise DataError(f"data.tokenizer gpt2+mul needs data.condition baseline or mul_tokens ({got}); "
                        "set --set data.condition=mul_tokens (or baseline)")
    return condition


def check_data_condition(condition: str | None, kind: str, tokenizer_condition: str | None = None) -> None:
    """``data.condition`` goes with the ``gpt2+mul`` tokenizer and only with it; a given
    ``gpt2+mul`` tokenizer (``tokenizer_condition``) must be of that condition.

    Raises:
        DataError: one line naming the setting to change.
    """
    if kind == KIND and condition is None:
        raise DataError("data.tokenizer gpt2+mul needs data.condition; set --set data.condition=mul_tokens "
                        "(or baseline)")
    if condition is not None and kind != KIND:
        raise DataError(f"data.condition {condition} needs data.tokenizer gpt2+mul, not {kind}; "
                        "set --set data.tokenizer=gpt2+mul")
    if tokenizer_condition is not None and tokenizer_condition != condition:
        raise DataError(f"data.condition is {condition} but the tokenizer given is the "
                        f"{tokenizer_condition} one; set --set data.condition={tokenizer_condition}")


def expected_added(kind: str, added_tokens: tuple[AddedToken, ...]) -> tuple[AddedToken, ...]:
    """The added tokens a freshly built tokenizer of ``kind`` ends up with when ``added_tokens``
    are added to it (``gpt2+mul``'s own 92 first)."""
    return (*builtin_tokens(), *added_tokens) if kind == KIND else tuple(added_tokens)


class GPT2MulTokenizer(GPT2Tokenizer):
    """GPT-2 BPE + padding + mul tokens (50,349 ids) in the ``baseline`` or ``mul_tokens`` condition.

    Raises:
        DataError: ``condition`` is not ``baseline`` or ``mul_tokens``.
    """

    kind = KIND

    def __init__(self, mergeable_ranks: dict[bytes, int], condition: str):
        self.condition = check_condition(condition)
        super().__init__(mergeable_ranks)
        self.add_tokens(builtin_tokens())

    @classmethod
    def from_gpt2(cls, gpt2: GPT2Tokenizer, condition: str) -> GPT2MulTokenizer:
        """The same BPE as ``gpt2`` with the experiment's ids added."""
        return cls(gpt2.mergeable_ranks, condition)

    def encode_text_with_bytes(self, texts: list[str], *, legacy_regex: bool = False) -> list[BytesEncoding]:
        """``(ids, n_bytes)`` of raw texts as the shards of this condition encode them: in
        ``mul_tokens`` through the injection rule (:func:`~lmkit.data.mul_tokens.inject_segments`,
        each mul token counting the bytes of the text it replaced), in ``baseline`` as plain
        :meth:`encode_batch_with_bytes`. What an evaluation of raw text (perplexity, bits per byte)
        uses to score a model of this condition on the text it was trained on."""
        if self.condition != "mul_tokens":
            return self.encode_batch_with_bytes(texts)
        rows = [[piece for seg in inject_segments(text, legacy_regex=legacy_regex)
                 for piece in (self.added_segments(seg) if isinstance(seg, str) else [seg])] for text in texts]
        return self.encode_segments_with_bytes(rows)

    def _unmatched_texts(self) -> frozenset[str]:
        never = {padding_token_string(i) for i in range(len(PADDING_IDS))}
        if self.condition == "baseline":
            never |= set(mul_strings())
        return frozenset(never)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        meta = super()._save_files(directory)
        meta["condition"] = self.condition
        return meta

    def _fingerprint(self) -> str:
        return f"gpt2-r50k+mul:{self.condition}"


def load_mul_tokenizer(directory: Path, meta: dict[str, Any]) -> GPT2MulTokenizer:
    """Rebuild a saved ``gpt2+mul`` tokenizer (its condition from ``meta``; tokens added on top of
    the built-in ones are added again).

    Raises:
        DataError: no condition in the meta file, or its built-in ids differ from these.
    """
    condition = meta.get("condition")
    if condition not in CONDITIONS:
        raise DataError(f"{directory}: the gpt2+mul tokenizer's condition is missing or unknown ({condition!r})")
    tokenizer = GPT2MulTokenizer.from_gpt2(GPT2Tokenizer.from_files(directory), condition)
    builtin = {t.id: t for t in tokenizer.added_tokens}
    extra = []
    for entry in meta.get("added_tokens", []):
        token = AddedToken(**entry)
        if token.id not in builtin:
            extra.append(token)
        elif builtin[token.id] != token:
            raise DataError(f"{directory}: id {token.id} is {token.text!r} there, but gpt2+mul has "
                            f"{builtin[token.id].text!r}; the tokenizer files are from another layout")
    if extra:
        tokenizer.add_tokens(extra)
    return tokenizer


__all__ = ["KIND", "GPT2MulTokenizer", "builtin_tokens", "check_condition", "check_data_condition", "expected_added",
           "load_mul_tokenizer"]
