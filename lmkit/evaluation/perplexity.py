"""The ``perplexity`` task: mean loss (nats/token), perplexity and bits per byte.

Data: the run's own validation split, rebuilt from its data config (the prepared token
shards for text runs, the val examples for arithmetic runs) and checked against the
checkpoint's ``data_fingerprint``; or ``--data FILE``, a text file (``--encoding``, as
``train`` has; UTF-8 by default) tokenized line by line with the run's tokenizer, as
training tokenizes text files. A token stream is scored whole: non-overlapping
``block_size`` windows from its start, then the tail shorter than a window as a final
short window, so every token but the first is predicted once. ``--limit N`` scores the
first N windows (or examples).

Bits per byte (after nanochat's ``evaluate_bpb``, SEEDS_SPEC 2.6)::

    bpb = sum_t CE_t * scored_t / (ln 2 * sum_t bytes_t)

where ``bytes_t`` is the UTF-8 length of the original text target ``t`` covers, from the
end of the previous token to its own end (stored per token with the shards and computed
from the tokenizer's offsets: see :mod:`lmkit.data.token_bytes`), so ``sum_t bytes_t`` is
the UTF-8 length of the text predicted. ``scored_t`` drops only special tokens that stand
for no text (separators: 0 bytes, 0 nats). Shards written before the per-token counts
existed fall back to a per-id table (``▁`` counted as a space, special tokens 0, byte-level
pieces their raw bytes). Chat data: the counts each conversation carries
(:attr:`~lmkit.data.batching.LabelledSequence.n_bytes`). A ``mul_tokens`` run's ``--data`` file
is injected as its training text was (:func:`text_tokens`). bpb does not depend on the tokenizer, so it compares runs whose
tokenizers differ; loss and perplexity do not.

``data_sha256`` is the SHA-256 of the ``--data`` file, or of the val split's UTF-8 text,
so ``compare`` can tell when two runs were scored on different text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmkit.data import PreparedData, prepare_data
from lmkit.data.batching import IGNORE_INDEX
from lmkit.data.token_bytes import special_id_mask, token_byte_table
from lmkit.data.tokenizers import Tokenizer
from lmkit.errors import DataError
from lmkit.evaluation.task import EvalContext, TaskResult, file_sha256

VERSION = "2"

#: The per-id byte table (the fallback for shards without per-token counts).
token_byte_lengths = token_byte_table


@dataclass
class LossSums:
    """Sums over every scored target token.

    Attributes:
        nats: sum of per-token cross-entropies (nats) over all targets.
        n_tokens: number of targets (``-100`` excluded).
        bpb_nats: the same sum without the special targets that stand for no text (spec 2.6).
        n_bytes: sum of the targets' UTF-8 byte counts.
    """

    nats: float = 0.0
    n_tokens: int = 0
    bpb_nats: float = 0.0
    n_bytes: int = 0

    @property
    def mean_loss(self) -> float:
        """Nats per target token (``nan`` with no targets)."""
        return self.nats / self.n_tokens if self.n_tokens else math.nan

    @property
    def bpb(self) -> float:
        """Bits per UTF-8 byte (``inf`` with no bytes)."""
        return self.bpb_nats / (math.log(2) * self.n_bytes) if self.n_bytes else math.inf


@torch.no_grad()
def loss_sums(model: nn.Module, batches: Iterable[tuple[np.ndarray, ...]], token_bytes: np.ndarray | None,
              device: torch.device, progress: Callable[[int], None] | None = None, *,
              special: np.ndarray | None = None,
              autocast: Callable[[], AbstractContextManager] | None = None) -> LossSums:
    """Per-token cross-entropy and byte counts summed over ``batches`` (fp32 logits, float64 sums).

    Args:
        model: maps ids ``(B, T)`` to ``(logits (B, T, V), _)`` (called without targets).
        batches: ``(x, y)`` or ``(x, y, y_bytes)`` arrays of shape ``(B, T)``: ids, target
            ids (``-100`` ignored) and, optionally, each target's UTF-8 byte count (from
            :meth:`lmkit.data.PreparedData.token_bytes`; see :func:`scored_windows`).
        token_bytes: ``(V,)`` bytes per id (:func:`token_byte_lengths`), used for batches
            without ``y_bytes``; may be ``None`` when every batch has them.
        device: where ``model`` lives.
        progress: called with the number of rows of each batch once it is scored.
        special: ``(V,)`` bool, ids that stand for no text
            (:func:`lmkit.data.token_bytes.special_id_mask`): a target with such an id and
            0 bytes adds no nats to ``bpb_nats``. Default: ``token_bytes == 0``.
        autocast: a context-manager factory wrapped around each forward (mixed precision).

    Raises:
        ValueError: a batch without ``y_bytes`` and no ``token_bytes``.
    """
    table = None if token_bytes is None else torch.as_tensor(np.asarray(token_bytes), dtype=torch.int64,
                                                             device=device)
    if special is None:
        special_t = None if table is None else table == 0
    else:
        special_t = torch.as_tensor(np.asarray(special), dtype=torch.bool, device=device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    bpb_nats = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = torch.zeros((), dtype=torch.int64, device=device)
    n_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for batch in batches:
        x = torch.from_numpy(np.ascontiguousarray(batch[0], dtype=np.int64)).to(device)
        y = torch.from_numpy(np.ascontiguousarray(batch[1], dtype=np.int64)).to(device).reshape(-1)
        with autocast() if autocast is not None else nullcontext():
            logits, _ = model(x)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y,
                             ignore_index=IGNORE_INDEX, reduction="none").double()
        valid = y != IGNORE_INDEX
        ids = y.clamp(min=0)
        if len(batch) > 2:
            nbytes = torch.from_numpy(np.asarray(batch[2], dtype=np.int64).reshape(-1)).to(device)
        elif table is not None:
            nbytes = table[ids]
        else:
            raise ValueError("loss_sums: a batch without byte counts needs token_bytes")
        nbytes = torch.where(valid, nbytes, 0)
        if special_t is not None:
            scored = valid & ~(special_t[ids] & (nbytes == 0))
        else:
            scored = valid
        nats += ce.sum()
        bpb_nats += torch.where(scored, ce, 0.0).sum()
        n_tokens += valid.sum()
        n_bytes += nbytes.sum()
        if progress is not None:
            progress(x.size(0))
    return LossSums(float(nats.item()), int(n_tokens.item()), float(bpb_nats.item()), int(n_bytes.item()))


def scored_windows(tokens: np.ndarray, token_bytes: np.ndarray | None, block_size: int, batch_size: int, *,
                   limit: int | None = None, tail: bool = True) -> tuple[int, Iterator[tuple[np.ndarray, ...]]]:
    """Non-overlapping windows over a token stream, with each target's byte count.

    Windows of ``w = min(block_size, N - 1)`` tokens from the start (the same windows as
    :func:`lmkit.data.batching.sequential_windows`), then, with ``tail``, the remaining
    ``(N - 1) mod w`` targets as one shorter window: every token but the first is a
    target exactly once.

    Args:
        tokens: ``(N,)`` ids (a memmap is read lazily).
        token_bytes: ``(N,)`` bytes per token, aligned with ``tokens``, or ``None``.
        block_size: the model's context ``T``.
        batch_size: windows per batch (the tail window is a batch of its own).
        limit: score only the first ``limit`` windows (the tail counts as one).
        tail: score the tail shorter than a window.

    Returns:
        ``(n_windows, batches)``; batches are ``(x, y)`` or ``(x, y, y_bytes)`` int64
        arrays of shape ``(b, w)`` (``(1, r)`` for the tail).
    """
    n = len(tokens)
    if n < 2:
        return 0, iter(())
    width = min(block_size, n - 1)
    n_full = (n - 1) // width
    rest = (n - 1) - n_full * width
    n_windows = n_full + (1 if tail and rest else 0)
    if limit is not None:
        n_windows = min(n_windows, limit)

    def take(starts: np.ndarray, w: int) -> tuple[np.ndarray, ...]:
        index = starts[:, None] + np.arange(w + 1, dtype=np.int64)
        chunk = np.asarray(tokens[index], dtype=np.int64)
        out: tuple[np.ndarray, ...] = (np.ascontiguousarray(chunk[:, :-1]), np.ascontiguousarray(chunk[:, 1:]))
        if token_bytes is not None:
            out += (np.asarray(token_bytes[index[:, 1:]], dtype=np.int64),)
        return out

    def generate() -> Iterator[tuple[np.ndarray, ...]]:
        full = min(n_full, n_windows)
        for first in range(0, full, batch_size):
            starts = np.arange(first, min(first + batch_size, full), dtype=np.int64) * width
            yield take(starts, width)
        if n_windows > n_full:
            yield take(np.array([n_full * width], dtype=np.int64), rest)

    return n_windows, generate()


_TABLES: dict[int, tuple[Tokenizer, int, np.ndarray, np.ndarray]] = {}


def byte_tables(tokenizer: Tokenizer, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(token_byte_table, special_id_mask)`` of ``tokenizer`` padded to ``size``, cached
    per tokenizer object (a 250k-id table takes a moment to build)."""
    size = max(size or 0, tokenizer.vocab_size)
    cached = _TABLES.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer or cached[1] != size or len(cached[2]) != size:
        cached = (tokenizer, size, token_byte_table(tokenizer, size), special_id_mask(tokenizer, size))
        _TABLES.clear()  # one tokenizer at a time: a run has one
        _TABLES[id(tokenizer)] = cached
    return cached[2], cached[3]


def split_loss_sums(model: nn.Module, data: PreparedData, split: str, block_size: int, batch_size: int,
                    device: torch.device, *, limit: int | None = None, tail: bool = True,
                    vocab_size: int | None = None, autocast: Callable[[], AbstractContextManager] | None = None,
                    progress: Callable[[int], None] | None = None) -> LossSums:
    """Loss and bits per byte of one split of a run's data (what in-training validation calls).

    Text data: :func:`scored_windows` over ``data.tokens(split)`` with the per-token byte
    counts ``data.token_bytes(split)``; chat and arithmetic: the split's sequences in order,
    padded (chat with the byte counts each sequence carries, arithmetic with the per-id table).

    Args:
        model: called as ``model(x)``, in eval mode (its mode is restored afterwards).
        data: from :func:`lmkit.data.prepare_data`.
        split: ``"val"``, ``"train"``, ...
        block_size: the model's context.
        batch_size: windows (or examples) per forward.
        device: where ``model`` lives.
        limit: only the first ``limit`` windows (examples).
        tail: also score the tail shorter than a window.
        vocab_size: ``model.vocab_size`` when larger than the tokenizer's.
        autocast: a context-manager factory around each forward (e.g. ``DevicePlan.autocast``).
        progress: called with the rows of each scored batch.

    Returns:
        :class:`LossSums` (``mean_loss``, ``bpb``, ``n_tokens``, ``n_bytes``).

    Raises:
        DataError: no such split.
    """
    from lmkit.data.batching import example_batches_in_order

    table, special = byte_tables(data.tokenizer, vocab_size)
    if data.task == "lm":
        _, batches = scored_windows(data.tokens(split), data.token_bytes(split), block_size, batch_size,
                                    limit=limit, tail=tail)
    else:
        if split not in data.sequences:
            raise DataError(f"the data has no {split} split (splits: {', '.join(data.sequences)})")
        seqs = data.sequences[split][:limit] if limit is not None else data.sequences[split]
        # chat sequences carry each id's original bytes (a mul id: the text it replaced)
        batches = example_batches_in_order(seqs, batch_size, data.tokenizer.pad_id or 0, with_bytes=True)
    was_training = model.training
    model.eval()
    try:
        return loss_sums(model, batches, table, device, progress, special=special, autocast=autocast)
    finally:
        model.train(was_training)


def injects_mul(tokenizer: Tokenizer) -> bool:
    """Whether ``tokenizer`` is a ``gpt2+mul`` one of the ``mul_tokens`` condition, whose
    training text went through the injection rule (SEEDS_SPEC 1.2)."""
    return getattr(tokenizer, "condition", None) == "mul_tokens" and hasattr(tokenizer, "encode_text_with_bytes")


def text_tokens(path: Path, tokenizer: Tokenizer, encoding: str = "utf-8", *,
                legacy_regex: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """The ids of a text file and each token's byte count, tokenized line by line (as
    training tokenizes text files; the last line gets no newline the file does not have).
    A ``gpt2+mul`` tokenizer of the ``mul_tokens`` condition (:func:`injects_mul`) encodes as
    its shards do, through the injection rule (``legacy_regex``: ``data.legacy_regex``), each
    mul token counting the bytes of the text it replaced.

    Returns:
        ``(ids, n_bytes, text_bytes)``: ``(N,)`` int64 ids, ``(N,)`` int64 UTF-8 bytes per
        token, and the UTF-8 length of the whole text.

    Raises:
        DataError: unreadable, not ``encoding``, or fewer than 2 tokens.
    """
    try:
        text = path.read_text(encoding=encoding)
    except (OSError, UnicodeDecodeError, LookupError) as exc:
        hint = " (pass --encoding latin-1, or the file's real encoding)" if isinstance(exc, UnicodeDecodeError) else ""
        raise DataError(f"--data {path}: cannot read it as {encoding} text ({exc}){hint}") from None
    lines = text.splitlines(keepends=True)
    ids: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    inject = injects_mul(tokenizer)
    for start in range(0, len(lines), 2048):
        chunk = lines[start : start + 2048]
        rows = (tokenizer.encode_text_with_bytes(chunk, legacy_regex=legacy_regex) if inject  # type: ignore[attr-defined]
                else tokenizer.encode_batch_with_bytes(chunk))
        for row_ids, row_bytes in rows:
            ids.append(np.asarray(row_ids, dtype=np.int64))
            counts.append(np.asarray(row_bytes, dtype=np.int64))
    all_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    if len(all_ids) < 2:
        raise DataError(f"--data {path}: {len(all_ids)} token(s); perplexity needs at least 2")
    return all_ids, np.concatenate(counts), len(text.encode("utf-8", errors="surrogatepass"))


def evaluate(ctx: EvalContext) -> TaskResult:
    """Mean loss, perplexity and bpb of the run's val split or ``ctx.data`` (a text file).

    ``ctx.options``: ``encoding`` (of ``--data``), ``data_fingerprint`` (the checkpoint's,
    compared with the rebuilt val split's; a mismatch is reported in ``notes`` and
    ``details["data_fingerprint_matches"]``).

    Raises:
        DataError: the data cannot be read or rebuilt, or was tokenized differently.
    """
    cfg = ctx.config
    block_size = cfg.model.block_size
    vocab = max(cfg.model.vocab_size or 0, ctx.tokenizer.vocab_size)
    details: dict = {}
    notes: list[str] = []
    if ctx.data is not None:
        encoding = ctx.options.get("encoding", "utf-8")
        legacy = bool(getattr(cfg.data, "legacy_regex", False))
        tokens, token_bytes, text_bytes = text_tokens(Path(ctx.data), ctx.tokenizer, encoding, legacy_regex=legacy)
        total, batches = scored_windows(tokens, token_bytes, block_size, ctx.batch_size, limit=ctx.limit)
        data_file, data_sha = str(ctx.data), file_sha256(Path(ctx.data))
        details.update({"encoding": encoding, "text_bytes": text_bytes, "bytes_source": "per token"})
        if injects_mul(ctx.tokenizer):
            rule = "the seed's unguarded regex (data.legacy_regex)" if legacy else "word-boundary guards"
            details["text_encoding"] = "mul_tokens injection, legacy regex" if legacy else "mul_tokens injection"
            notes.append(f"--data was encoded as the mul_tokens run's training text: multiplication facts injected "
                         f"as mul tokens ({rule}), each counting the bytes of the text it replaced")
        else:
            details["text_encoding"] = "plain"
        unit = "windows"
    else:
        # A fine-tuned run (init_from) encoded its data with the source run's tokenizer: do the same.
        given = ctx.tokenizer if cfg.init_from else None
        data = prepare_data(cfg.data, added_tokens=() if given else getattr(ctx.tokenizer, "added_tokens", ()),
                            tokenizer=given, block_size=block_size)
        if data.tokenizer.fingerprint() != ctx.tokenizer.fingerprint():
            raise DataError(f"{cfg.data.dataset}: the val split rebuilt now is tokenized differently from the run's "
                            "tokenizer; pass --data FILE to score a text file with the run's tokenizer")
        data_file = f"{cfg.data.dataset} (val split)"
        data_sha = data.text_sha256("val")
        _check_fingerprint(data.fingerprint(), ctx.options.get("data_fingerprint"), cfg.data.dataset, details, notes)
        if data.task == "lm":
            details["bytes_source"] = data.bytes_source("val")
            if details["bytes_source"] != "per token":
                notes.append("bpb: this token cache predates per-token byte counts, so bytes come from a per-id "
                             "table (exact for byte/gpt2/bpe/char; a Metaspace tokenizer's line starts count one "
                             "space too many); delete the cache folder to rebuild it with exact counts")
            total, _ = scored_windows(data.tokens("val"), None, block_size, ctx.batch_size, limit=ctx.limit)
            unit = "windows"
        else:
            total = len(data.sequences["val"][: ctx.limit] if ctx.limit is not None else data.sequences["val"])
            unit = "examples"
            details["bytes_source"] = data.bytes_source("val")
    if total == 0:
        raise DataError(f"{data_file}: nothing to score")
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        ctx.progress(done, total)

    ctx.progress(0, total)
    if ctx.data is not None:
        table, special = byte_tables(ctx.tokenizer, vocab)
        sums = loss_sums(ctx.model, batches, table, ctx.device, step, special=special)
    else:
        sums = split_loss_sums(ctx.model, data, "val", block_size, ctx.batch_size, ctx.device, limit=ctx.limit,
                               vocab_size=vocab, progress=step)
    from lmkit.evaluation.lm import perplexity

    metrics = {"mean_loss": sums.mean_loss, "perplexity": perplexity(sums.mean_loss), "bpb": sums.bpb}
    details.update({"n_tokens": sums.n_tokens, "n_bytes": sums.n_bytes, "nats": sums.nats,
                    "bpb_nats": sums.bpb_nats, "unit": unit, "block_size": block_size,
                    "tokenizer": ctx.tokenizer.kind})
    if unit == "windows" and ctx.limit is not None:
        notes.append(f"--limit {ctx.limit}: the first {total:,} non-overlapping windows of up to {block_size} "
                     "tokens were scored, not the whole text")
    elif unit == "windows":
        notes.append(f"{total:,} non-overlapping windows of up to {block_size} tokens, the last shorter one "
                     "holding the tail: every token but the first is scored")
    return TaskResult(task="perplexity", version=VERSION, metrics=metrics, headline="bpb", n_items=total,
                      data_file=data_file, data_sha256=data_sha, details=details, notes=notes,
                      directions=DIRECTIONS)


#: Every metric of this task: lower is better.
DIRECTIONS = {"mean_loss": "lower", "perplexity": "lower", "bpb": "lower"}


def _check_fingerprint(actual: str, expected: str | None, dataset: str, details: dict, notes: list[str]) -> None:
    """Record the rebuilt data's fingerprint and whether it is the checkpoint's."""
    details["data_fingerprint"] = actual
    if expected is None:
        details["data_fingerprint_matches"] = None
        notes.append("the checkpoint records no data fingerprint: the val split could not be checked against "
                     "the one the run was trained with")
        return
    details["data_fingerprint_matches"] = actual == expected
    details["checkpoint_data_fingerprint"] = expected
    if actual != expected:
        notes.append(f"⚠ {dataset}: the val split rebuilt now differs from the run's (data fingerprint {actual}, "
                     f"the checkpoint has {expected}): the source or a data setting changed since training, "
                     "so these numbers are not on the run's own val data")
