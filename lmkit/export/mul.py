"""The multiplication-tokens study (seed 004) in a Hugging Face export: what the verification adds.

For a run whose tokenizer has the 45 mul tokens (``gpt2+mul`` in either condition, or any
tokenizer with the mul strings added at their ids: :func:`lmkit.export.tokenizer.mul_condition`),
:func:`lmkit.export.hf.verify_hf_folder` also compares the native and HF logits, teacher-forced,
on a batch that holds every mul id (:func:`mul_token_batch`), and checks the HF tokenizer on a
text holding every mul string (:func:`check_mul_tokenizer`). What the HF tokenizer holds per
condition, and ``--legacy-hf-tokenizer``, are in :func:`lmkit.export.tokenizer.save_hf_tokenizer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmkit.errors import ConfigError
from lmkit.events import Event, Notice
from lmkit.export.tokenizer import mul_condition

if TYPE_CHECKING:
    import torch

    from lmkit.data.tokenizers import Tokenizer


def mul_ids_in(batch: torch.Tensor) -> int:
    """How many distinct mul ids (50304..50348) ``batch`` holds."""
    from lmkit.data.mul_tokens import is_mul_id

    return sum(1 for i in set(batch.flatten().tolist()) if is_mul_id(i))


def mul_token_text() -> str:
    """A text holding every mul-token string once: ``"1 times 1 is <MUL_1_1_1>. 1 times 2 is …"``."""
    from lmkit.data.mul_tokens import mul_facts, mul_token_string

    return " ".join(f"{a} times {b} is {mul_token_string(a, b)}." for a, b, _ in mul_facts())


def mul_token_batch(tokenizer: Tokenizer, block_size: int, max_rows: int = 32) -> torch.Tensor | None:
    """Token ids ``(rows, T)`` holding every mul id, for a teacher-forced logit check; ``None``
    when ``tokenizer`` is not the study's (:func:`lmkit.export.tokenizer.mul_condition`).

    The sequence is ``encode(" a times b is ") + [mul id] + encode(".")`` per fact, so it holds
    the mul ids in either condition (the baseline's tokenizer never produces them from text),
    cut into rows of ``min(block_size, length)`` (at most ``max_rows``; the last row wraps
    around to the start): with ``block_size >= 16`` every one of the 45 mul ids is in it.
    """
    import torch

    if mul_condition(tokenizer) is None:
        return None
    from lmkit.data.mul_tokens import mul_facts, mul_token_id

    ids: list[int] = []
    for a, b, _ in mul_facts():
        ids += tokenizer.encode(f" {a} times {b} is ") + [mul_token_id(a, b)] + tokenizer.encode(".")
    t = min(block_size, len(ids))
    rows = min(max_rows, math.ceil(len(ids) / t))
    ids = (ids * 2)[: rows * t]  # the last row wraps around to the start
    return torch.tensor(ids, dtype=torch.long).view(rows, t)


def check_mul_tokenizer(hf_tok: Any, tokenizer: Tokenizer, problems: list[str],
                         legacy_hf_tokenizer: bool) -> dict[str, Any]:
    """The HF tokenizer against lmkit's on :func:`mul_token_text`: same ids, and a decode with
    ``skip_special_tokens=True`` that gives the text back; every mul string at its id when the
    strings were added. Appends to ``problems``; a baseline exported with the legacy HF tokenizer
    is expected to differ (reported, not judged)."""
    from lmkit.data.mul_tokens import mul_strings

    text = mul_token_text()
    theirs = hf_tok(text, add_special_tokens=False)["input_ids"]
    ours = tokenizer.encode(text)
    condition = mul_condition(tokenizer)
    added = condition == "mul_tokens" or legacy_hf_tokenizer
    out: dict[str, Any] = {"condition": condition, "strings_added": added, "hf_len": len(hf_tok),
                           "text_ids_equal": theirs == ours,
                           "roundtrip": hf_tok.decode(theirs, skip_special_tokens=True) == text}
    if condition == "mul_tokens":
        out["padding_strings"] = (
            "the 47 <|padding_i|> strings are added tokens (special unless --legacy-hf-tokenizer): like "
            "<|endoftext|>, HF reads their literal text as the id where lmkit spells it out, so text holding "
            "them is left out of this comparison; ordinary text encodes the same")
    if added:
        wrong = [s for s, i in mul_strings().items() if hf_tok.convert_tokens_to_ids(s) != i]
        out["strings_at_their_ids"] = not wrong
        if wrong:
            problems.append(f"HF tokenizer: {len(wrong)} mul string(s) not at their ids (first: {wrong[0]})")
    if not out["roundtrip"]:
        problems.append("HF tokenizer: decode(encode(mul text), skip_special_tokens=True) is not the text")
    if not out["text_ids_equal"]:
        if condition == "baseline" and legacy_hf_tokenizer:
            out["differs_from_lmkit"] = "expected: --legacy-hf-tokenizer reads each mul string as one id"
        else:
            problems.append("HF tokenizer: the mul-token text encodes to other ids than lmkit's")
    return out


def legacy_tokenizer_notice(tokenizer: Tokenizer, emit: Callable[[Event], None]) -> None:
    """Check ``--legacy-hf-tokenizer`` against the run's tokenizer and say what it does.

    Raises:
        ConfigError: the run's tokenizer is not the multiplication-tokens study's.
    """
    condition = mul_condition(tokenizer)
    if condition is None:
        raise ConfigError(f"--legacy-hf-tokenizer is for runs of the multiplication-tokens study (data.tokenizer "
                          f"gpt2+mul); this run's tokenizer is {tokenizer.kind}")
    if condition == "mul_tokens":
        emit(Notice("info", "--legacy-hf-tokenizer in the mul_tokens condition: the 47 padding strings are "
                            "added non-special, as the original's HF builder did (skip_special_tokens then keeps "
                            "them; lmkit's decode drops them); the mul strings are the same either way"))
        return
    emit(Notice("warning", "--legacy-hf-tokenizer: the HF tokenizer gets the 47 padding and 45 mul strings as "
                           "the original's HF builder added them, so it reads '<MUL_6_9_54>' as one id (50342) where "
                           "lmkit's baseline tokenizer -- and the baseline's training data -- spell it out in "
                           "plain BPE; HF and lmkit baseline tokenizations then differ on such text"))
