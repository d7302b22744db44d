"""Multiplication-fact tokens: 45 ``<MUL_a_b_c>`` ids on GPT-2's vocabulary and the text rule that makes them.

The domain-token experiment (zhengpu-berkeley/domain-token-gpt2, ``tokenizer/mul_facts.py`` and
``tokenizer/inject_mul.py``) gives every unordered one-digit fact ``a x b`` (``1 <= a <= b <= 9``) one
token ``<MUL_a_b_c>`` with ``c = a * b``. The id layout is the same in both of its conditions, so
the two models have the same architecture:

* 0..50256: GPT-2 BPE (``<|endoftext|>`` = 50256);
* 50257..50303: 47 unused padding ids (nanoGPT pads 50,257 to 50,304), strings ``<|padding_i|>``;
* 50304..50348: the 45 mul tokens in row-major canonical order (a = 1: b = 1..9, a = 2: b = 2..9,
  ...): ``index(a, b) = sum_{i<a} (10 - i) + (b - a)``, so ``<MUL_6_9_54>`` = 50342;
* vocabulary 50,349.

**Injection** (:func:`inject`, :func:`inject_segments`) rewrites multiplication facts in text before
tokenization. Pattern, case-insensitive: ``(\\d{1,2})\\s*OP\\s*(\\d{1,2})(?:\\s*=\\s*(\\d+))?`` with
``OP`` one of ``*``, ``×``, or ``x`` not followed by a letter. A match is replaced (all of it,
the ``= c`` included) by the canonical token when ``a`` and ``b`` are in 1..9 and, if ``c`` is
present, ``c == a * b``; a bare ``a*b`` is injected too (the experiment's "weak" mode), so
``9 × 6`` becomes ``<MUL_6_9_54>``. Otherwise the text stays as it is.

lmkit's default adds word-boundary guards: no digit, ``.`` or digit + ``,`` before ``a``, no
digit (nor a ``.`` or ``,`` + digit: a decimal or a thousands separator) after the match, and the
``= c`` part is taken whole or not at all. So ``106*3``, ``2.5*3``, ``3*2.5``, ``15*20=300``,
``3 x 4,000``, ``2 x 1,500 = 3,000``, ``1,2*3`` and ``2*3=6,000`` stay as they are (a comma
followed by a space, ``6*9, 3*4``, is punctuation and does not block). ``legacy_regex=True`` is
the original pattern, unguarded: ``106*3`` -> ``1<MUL_3_6_18>`` (``06`` read as 6) and
``2.5*3`` -> ``2.<MUL_3_5_15>``. In both modes GSM8K's calculator annotations are rewritten:
``9 * 2 = <<9*2=18>>18`` -> ``<MUL_2_9_18> = <<<MUL_2_9_18>>>18``.
"""

from __future__ import annotations

import functools
import re

#: GPT-2's BPE vocabulary (ids 0..50256).
GPT2_BASE_VOCAB = 50257
#: First mul-token id (after nanoGPT's padding to 50,304).
MUL_FIRST_ID = 50304
#: Model vocabulary in both conditions: 50,304 + 45.
MUL_VOCAB_SIZE = 50349
#: The 47 unused ids between GPT-2's vocabulary and the mul tokens.
PADDING_IDS = range(GPT2_BASE_VOCAB, MUL_FIRST_ID)
#: The 45 mul-token ids.
MUL_IDS = range(MUL_FIRST_ID, MUL_VOCAB_SIZE)
#: The experiment's name for the two conditions.
CONDITIONS = ("baseline", "mul_tokens")

_OPS = r"(?:\*|×|x(?![a-z]))"
#: The original pattern (``tokenizer/inject_mul.py``), compiled with ``re.IGNORECASE``.
LEGACY_PATTERN = r"(\d{1,2})\s*" + _OPS + r"\s*(\d{1,2})(?:\s*=\s*(\d+))?"
#: lmkit's guarded pattern: not inside a longer number, a decimal or a digit group (``4,000``) on either side.
GUARDED_PATTERN = r"(?<![\d.])(?<!\d,)(\d{1,2})\s*" + _OPS + r"\s*(\d{1,2})(?:\s*=\s*(\d+))?+(?!\d|[.,]\d)"

_LEGACY_RE = re.compile(LEGACY_PATTERN, re.IGNORECASE)
_GUARDED_RE = re.compile(GUARDED_PATTERN, re.IGNORECASE)

Segment = str | tuple[int, str]


@functools.cache
def mul_facts() -> list[tuple[int, int, int]]:
    """The 45 facts ``(a, b, a*b)``, ``1 <= a <= b <= 9``, in id order (row-major)."""
    return [(a, b, a * b) for a in range(1, 10) for b in range(a, 10)]


def _check(a: int, b: int) -> tuple[int, int]:
    if not (1 <= a <= 9 and 1 <= b <= 9):
        raise ValueError(f"mul tokens cover 1..9 x 1..9, not {a} x {b}")
    return (a, b) if a <= b else (b, a)


def mul_token_id(a: int, b: int) -> int:
    """Id of the fact ``a x b`` (either order): ``50304 + sum_{i<a}(10 - i) + (b - a)`` for ``a <= b``.

    Raises:
        ValueError: ``a`` or ``b`` outside 1..9.
    """
    a, b = _check(a, b)
    return MUL_FIRST_ID + sum(10 - i for i in range(1, a)) + (b - a)


def mul_token_string(a: int, b: int) -> str:
    """``<MUL_a_b_c>`` in canonical order (``a <= b``, ``c = a*b``), e.g. ``(9, 6)`` -> ``<MUL_6_9_54>``.

    Raises:
        ValueError: ``a`` or ``b`` outside 1..9.
    """
    a, b = _check(a, b)
    return f"<MUL_{a}_{b}_{a * b}>"


def padding_token_string(i: int) -> str:
    """The string of padding id ``50257 + i``: ``<|padding_i|>`` (i = 0..46), as the experiment's HF tokenizer adds them."""
    return f"<|padding_{i}|>"


def is_mul_id(token_id: int) -> bool:
    """``token_id`` is one of the 45 mul tokens (50304..50348)."""
    return MUL_FIRST_ID <= int(token_id) < MUL_VOCAB_SIZE


@functools.cache
def mul_strings() -> dict[str, int]:
    """Every mul-token string -> its id, in id order."""
    return {mul_token_string(a, b): mul_token_id(a, b) for a, b, _ in mul_facts()}


@functools.cache
def _literal_re() -> re.Pattern[str]:
    return re.compile("|".join(re.escape(s) for s in mul_strings()))


def _replace(match: re.Match[str]) -> int | None:
    """The id a match becomes, or ``None`` when the text stays (out of range, wrong product)."""
    a, b = int(match.group(1)), int(match.group(2))
    if not (1 <= a <= 9 and 1 <= b <= 9):
        return None
    if match.group(3) is not None and int(match.group(3)) != a * b:
        return None
    return mul_token_id(a, b)


def inject_segments(text: str, *, legacy_regex: bool = False) -> list[Segment]:
    """``text`` cut into plain-text pieces and ``(mul_id, original_text)`` pairs.

    A pair is one mul token standing for ``original_text``: a multiplication the injection rule
    rewrites (``"6 * 9 = 54"`` -> ``(50342, "6 * 9 = 54")``), or a mul-token string already in
    the text (``"<MUL_6_9_54>"``, which the tokenizer of the ``mul_tokens`` condition reads as that
    id). Ready for :meth:`~lmkit.data.tokenizer_base.Tokenizer.encode_segments_with_bytes`, which
    gives each mul token the UTF-8 bytes of its original text (what bits per byte divides by).
    Joining the pieces' texts gives ``text`` back; no two text pieces are adjacent.

    Args:
        text: the original text.
        legacy_regex: the experiment's unguarded pattern (see the module docstring).
    """
    pattern = _LEGACY_RE if legacy_regex else _GUARDED_RE
    by_text = mul_strings()
    out: list[Segment] = []
    pos = 0
    for literal in _literal_re().finditer(text) if "<MUL_" in text else ():
        _inject_piece(text, pos, literal.start(), pattern, out)
        out.append((by_text[literal.group()], literal.group()))
        pos = literal.end()
    _inject_piece(text, pos, len(text), pattern, out)
    return out


def _inject_piece(text: str, start: int, end: int, pattern: re.Pattern[str], out: list[Segment]) -> None:
    """Append the segments of ``text[start:end]`` (no mul-token strings in it) to ``out``."""
    pos = start
    for match in pattern.finditer(text, start, end):
        token_id = _replace(match)
        if token_id is None:
            continue
        if match.start() > pos:
            out.append(text[pos : match.start()])
        out.append((token_id, match.group()))
        pos = match.end()
    if end > pos:
        out.append(text[pos:end])


def inject(text: str, *, legacy_regex: bool = False) -> str:
    """``text`` with every multiplication fact the rule accepts replaced by its ``<MUL_a_b_c>`` string.

    ``"6*9=54"`` -> ``"<MUL_6_9_54>"``, ``"9 × 6"`` -> ``"<MUL_6_9_54>"``, ``"6*9=55"`` unchanged.
    """
    id_to_text = {i: s for s, i in mul_strings().items()}
    return "".join(seg if isinstance(seg, str) else id_to_text[seg[0]]
                   for seg in inject_segments(text, legacy_regex=legacy_regex))


def count_mul_ids(ids) -> int:
    """How many of ``ids`` (any integer sequence or array) are mul tokens."""
    import numpy as np

    arr = np.asarray(ids)
    return int(((arr >= MUL_FIRST_ID) & (arr < MUL_VOCAB_SIZE)).sum())


__all__ = ["CONDITIONS", "GPT2_BASE_VOCAB", "MUL_FIRST_ID", "MUL_IDS", "MUL_VOCAB_SIZE", "PADDING_IDS",
           "count_mul_ids", "inject", "inject_segments", "is_mul_id", "mul_facts", "mul_strings",
           "mul_token_id", "mul_token_string", "padding_token_string"]
