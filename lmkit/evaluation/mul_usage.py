"""Counting generated multiplication-fact tokens (seed 004, SEEDS_SPEC §1.1, §1.2 "Mul-token accounting").

A tokenizer *has mul tokens* when its added tokens include the 45 strings ``<MUL_a_b_c>``
(``1 <= a <= b <= 9``, ``c = a·b``) at their ids 50304..50348
(:mod:`lmkit.data.mul_tokens`: ``is_mul_id``, ``mul_token_string``). That is decided from
the tokenizer itself, never from a run's name or config. A ``gpt2+mul`` tokenizer has them
in both conditions (the ids exist in both models; in the ``baseline`` condition ``encode``
leaves the strings as text, but a generated mul id still decodes to its string), so both
conditions' results carry counts -- the baseline's are expected to be near 0, as in the seed,
whose Hugging Face tokenizer had the tokens in both conditions. A plain ``gpt2`` tokenizer
has none: no counts.

Counts are taken from the generated ids (which :func:`lmkit.evaluation.generate.generate_ex`
already cut at EOS), not by searching the decoded text: an id in the mul range counts once,
whatever text surrounds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def mul_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of ``tokenizer``'s added tokens that are mul tokens (empty when it has none).

    An added token counts when its id is a mul id and its text is that id's canonical
    string (``<MUL_6_9_54>`` at 50342). Objects without ``added_tokens`` (a test double)
    have none.
    """
    from lmkit.data.mul_tokens import is_mul_id, mul_facts, mul_token_id, mul_token_string

    added = getattr(tokenizer, "added_tokens", None) or ()
    backend = getattr(tokenizer, "backend", None)
    if not added and backend is not None and hasattr(backend, "token_to_id"):
        # an ``hf:`` tokenizer (e.g. the export of a mul_tokens run): the strings live in the backend
        return frozenset(mul_token_id(a, b) for a, b, _ in mul_facts()
                         if backend.token_to_id(mul_token_string(a, b)) == mul_token_id(a, b))
    if not added:
        return frozenset()
    canonical = {mul_token_id(a, b): mul_token_string(a, b) for a, b, _ in mul_facts()}
    return frozenset(t.id for t in added if is_mul_id(t.id) and canonical.get(t.id) == t.text)


def count_mul(ids: Iterable[int], mul_ids: frozenset[int]) -> int:
    """How many of ``ids`` are in ``mul_ids``."""
    return sum(1 for i in ids if int(i) in mul_ids)


def usage(rows: Sequence[Sequence[int]], mul_ids: frozenset[int]) -> tuple[int, list[int]]:
    """``(total, per_row)`` mul-token counts of generated id rows."""
    per_row = [count_mul(row, mul_ids) for row in rows]
    return sum(per_row), per_row
