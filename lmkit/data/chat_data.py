"""Chat data as a :class:`~lmkit.data.PreparedData` (``data.format: chat``): rows read and
encoded by :mod:`lmkit.data.chat`, an optional token budget (``data.max_tokens``, whole
conversations in order), the items cut to the model's context, and the data stats
(conversations, learned targets, injected mul tokens, cut items) for
:class:`~lmkit.events.DataReady`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

from lmkit.config import DataConfig
from lmkit.data import PreparedData, mul_injection_notice
from lmkit.data.batching import IGNORE_INDEX
from lmkit.data.chat import ChatItem, chat_text, count_injected, encode_chat, load_chat_rows
from lmkit.data.tokenizer_base import AddedToken, Tokenizer
from lmkit.data.tokenizers import build_tokenizer
from lmkit.errors import ConfigError, DataError
from lmkit.events import DataReady, Event, Notice, null_emit


def prepare_chat_data(config: DataConfig, emit: Callable[[Event], None] = null_emit, *,
                      added_tokens: tuple[AddedToken, ...] = (), tokenizer: Tokenizer | None = None,
                      block_size: int | None = None) -> PreparedData:
    """The ``chat`` :class:`~lmkit.data.PreparedData` of ``config`` (see :func:`lmkit.data.prepare_data`).

    Raises:
        ConfigError: ``data.inject_answers`` outside the ``mul_tokens`` condition,
            ``data.include_synthetic``, or ``data.max_tokens`` with a tokenizer trained on the data.
        DataError: unreadable rows, a split without conversations, a tokenizer without EOS, or a
            ``data.condition`` that does not go with the tokenizer.
    """

    if config.inject_answers and config.condition != "mul_tokens":
        raise ConfigError("data.inject_answers: it injects mul tokens into GSM8K answers, so it needs "
                          "data.condition: mul_tokens")
    if config.include_synthetic:
        raise ConfigError("data.include_synthetic: the drill block is pretraining text; chat data has no place for it")
    extra = {"condition": config.condition} if config.condition is not None else {}
    trained = config.tokenizer in ("bpe", "char")
    if tokenizer is None and not trained:
        tokenizer = build_tokenizer(config.tokenizer, **extra)
    take = None
    if config.max_tokens is not None:
        if tokenizer is None:
            raise ConfigError(f"data.max_tokens: a chat budget is counted in tokens of a tokenizer that is not trained "
                              f"on the data ({config.tokenizer} is); use byte, gpt2, gpt2+mul, hf:NAME, or the tokenizer "
                              "of the run you fine-tune")
        take = functools.partial(_take_tokens, tokenizer=tokenizer, budget=config.max_tokens)
    rows = load_chat_rows(config.dataset, encoding=config.encoding, val_fraction=config.val_fraction, take=take)
    if tokenizer is None:
        train_texts = (chat_text(item) for item in rows.splits["train"])
        tokenizer = build_tokenizer(config.tokenizer, train_texts=train_texts, bpe_vocab_size=config.bpe_vocab_size,
                                    **extra)
    missing = [t for t in added_tokens if t not in tokenizer.added_tokens]
    if missing:
        tokenizer.add_tokens(missing)
    if config.condition is not None and tokenizer.kind != "gpt2+mul":
        raise DataError(f"data.condition {config.condition} needs data.tokenizer gpt2+mul, not {tokenizer.kind}; "
                        "set --set data.tokenizer=gpt2+mul")
    if getattr(tokenizer, "condition", None) not in (None, config.condition):
        raise DataError(f"data.condition is {config.condition} but the tokenizer given is the "
                        f"{tokenizer.condition} one; set --set data.condition={tokenizer.condition}")
    notice = mul_injection_notice(tokenizer, config.condition)
    if notice is not None:
        emit(notice)
    inject = None
    if config.condition == "mul_tokens":
        from lmkit.data.mul_tokens import inject_segments  # helper of the mul_tokens condition

        inject = functools.partial(inject_segments, legacy_regex=config.legacy_regex)
    sequences: dict[str, list[list[int]]] = {}
    texts: dict[str, list[str]] = {}
    mul_positions: dict[str, list[list[int]]] = {}
    stats: dict = {"format": "chat", "condition": config.condition, "conversations": {}, "label_tokens": {},
                   "skipped_rows": rows.skipped,
                   "loss_on": "legacy pad mask" if config.legacy_pad_mask else config.loss_on}
    if inject is not None:
        stats["mul_tokens_by_split"] = {}
    for split, items in rows.splits.items():
        enc = encode_chat(items, tokenizer, loss_on=config.loss_on, legacy_pad_mask=config.legacy_pad_mask,
                          inject=inject, inject_qa=config.inject_answers)
        if not enc.sequences:
            raise DataError(f"data.dataset: the {split} split of {config.dataset} has no conversations")
        sequences[split], texts[split], mul_positions[split] = enc.sequences, enc.texts, enc.mul_positions
        stats["conversations"][split] = len(enc.sequences)
        stats["label_tokens"][split] = enc.label_tokens
        if inject is not None:
            stats["mul_tokens_by_split"][split] = enc.mul_tokens
    if inject is not None:
        stats["mul_tokens"] = sum(stats["mul_tokens_by_split"].values())
    max_id = max(max(seq) for seqs in sequences.values() for seq in seqs)
    data = PreparedData("chat", tokenizer, rows.description, max_id, sequences=sequences, texts=texts, stats=stats)
    data._fixed_fingerprint = data.fingerprint()
    if block_size is not None:
        total = sum(len(v) for v in sequences.values())
        cut = data.truncate(block_size)
        stats["truncated"] = cut
        if cut:
            data.description += f"; {cut:,} of {total:,} cut to block_size + 1 = {block_size + 1} tokens"
            emit(Notice(level="warning", message=(
                f"{cut:,} of {total:,} conversations are longer than block_size + 1 = {block_size + 1} tokens and "
                "were cut (a cut one loses its final EOS); raise model.block_size to keep them whole")))
        # labels and injected mul ids of cut items changed: recount
        stats["label_tokens"] = {split: sum(sum(1 for x in seq.labels[1:] if x != IGNORE_INDEX) for seq in seqs)
                                 for split, seqs in sequences.items()}
        if inject is not None:
            stats["mul_tokens_by_split"] = {split: count_injected(seqs, mul_positions[split])
                                            for split, seqs in sequences.items()}
            stats["mul_tokens"] = sum(stats["mul_tokens_by_split"].values())
    emit(DataReady(description=data.description, tokenizer=tokenizer.kind, vocab_size=tokenizer.vocab_size,
                   split_sizes=data.split_sizes(), unit="examples", cache_dir=None, reused=False, stats=stats))
    return data


def _take_tokens(items: Iterator[ChatItem], *, tokenizer: Tokenizer, budget: int,
                 chunk: int = 256) -> list[ChatItem]:
    """Chat items in order until their texts (+ EOS) reach ``budget`` tokens (whole items)."""
    taken: list[ChatItem] = []
    used = 0
    batch: list[ChatItem] = []
    for item in items:
        batch.append(item)
        if len(batch) < chunk:
            continue
        for it, ids in zip(batch, tokenizer.encode_batch([chat_text(b) for b in batch]), strict=True):
            taken.append(it)
            used += len(ids) + 1
            if used >= budget:
                return taken
        batch = []
    for it, ids in zip(batch, tokenizer.encode_batch([chat_text(b) for b in batch]), strict=True):
        taken.append(it)
        used += len(ids) + 1
        if used >= budget:
            break
    return taken


__all__ = ["prepare_chat_data"]
