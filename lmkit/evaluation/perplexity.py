"""The ``perplexity`` task: mean loss (nats/token), perplexity and bits per byte.

Data: the run's own validation split, rebuilt from its data config (the prepared token
shards for text runs, the val examples for arithmetic runs), or ``--data FILE``, a UTF-8
text file tokenized with the run's tokenizer. A token stream is cut into
non-overlapping ``block_size`` windows from its start (the tail shorter than a window is
not scored); ``--limit N`` scores the first N windows (or examples).

Bits per byte follows nanochat's ``evaluate_bpb`` (SEEDS_SPEC 2.6)::

    bpb = sum_t CE_t * [bytes(y_t) > 0] / (ln 2 * sum_t bytes(y_t))

where ``bytes(v)`` is the UTF-8 length of token ``v`` and special tokens count 0 bytes
(and so 0 nats). Unlike nanochat, byte-level BPE tokens use their raw bytes
(``tiktoken``'s single-token bytes), so a token holding part of a multi-byte character
counts its real bytes, not the 3 bytes of U+FFFD. bpb does not depend on the tokenizer,
so it compares runs whose tokenizers differ; loss and perplexity do not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmkit.data.tokenizers import Tokenizer
from lmkit.errors import DataError
from lmkit.evaluation.task import EvalContext, TaskResult, file_sha256

VERSION = "1"
IGNORE_INDEX = -100


def token_byte_lengths(tokenizer: Tokenizer, size: int | None = None) -> np.ndarray:
    """UTF-8 byte length of every token id, 0 for special tokens.

    Args:
        tokenizer: the run's tokenizer.
        size: length of the table (``model.vocab_size``, which may exceed the tokenizer's
            vocabulary; the extra ids get 0 bytes). Default: ``tokenizer.vocab_size``.

    Returns:
        ``int64`` array of shape ``(size,)``.

    Byte-level tokenizers (``byte``, ``gpt2``, trained ``bpe``) use each token's raw
    bytes; the others ``len(decode([id]).encode("utf-8"))``.
    """
    from lmkit.data.tokenizers import ByteTokenizer, CharTokenizer, GPT2Tokenizer, HFTokenizer

    n = tokenizer.vocab_size
    table = np.zeros(max(n, size or 0), dtype=np.int64)
    specials = {i for i in (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id) if i is not None}
    if isinstance(tokenizer, ByteTokenizer):
        table[:256] = 1
    elif isinstance(tokenizer, GPT2Tokenizer):
        for i in range(n):
            if i not in specials:
                table[i] = len(tokenizer.enc.decode_single_token_bytes(i))
    elif isinstance(tokenizer, CharTokenizer):
        from lmkit.data.tokenizers import CHAR_SPECIALS

        for i in range(len(CHAR_SPECIALS), n):
            table[i] = len(tokenizer.itos[i].encode("utf-8"))
    elif isinstance(tokenizer, HFTokenizer):
        backend = tokenizer.backend
        specials |= {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        byte_of = _byte_level_alphabet() if _is_byte_level(backend) else None
        for i in range(n):
            if i in specials:
                continue
            piece = backend.id_to_token(i)
            if byte_of is not None and piece is not None and all(ch in byte_of for ch in piece):
                table[i] = len(piece)
            else:
                table[i] = len(tokenizer.decode([i]).encode("utf-8"))
    else:
        for i in range(n):
            if i not in specials:
                table[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return table


def _is_byte_level(backend) -> bool:
    import json

    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except ValueError:
        return False
    return decoder.get("type") == "ByteLevel"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` inverted: printable stand-in character -> byte."""
    from lmkit.export.tokenizer import bytes_to_unicode

    return {ch: b for b, ch in bytes_to_unicode().items()}


@dataclass
class LossSums:
    """Sums over every scored target token.

    Attributes:
        nats: sum of per-token cross-entropies (nats) over all targets.
        n_tokens: number of targets (``-100`` excluded).
        bpb_nats: the same sum over targets with ``bytes > 0`` only (spec 2.6).
        n_bytes: sum of the targets' UTF-8 byte lengths.
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
def loss_sums(model: nn.Module, batches: Iterable[tuple[np.ndarray, np.ndarray]], token_bytes: np.ndarray,
              device: torch.device, progress: Callable[[int], None] | None = None) -> LossSums:
    """Per-token cross-entropy summed over ``batches`` (fp32 logits, float64 sums).

    Args:
        model: maps ids ``(B, T)`` to ``(logits (B, T, V), _)``.
        batches: ``(x, y)`` int64 arrays of shape ``(B, T)``; targets ``-100`` are ignored.
        token_bytes: ``(V,)`` byte length per id (:func:`token_byte_lengths`).
        device: where ``model`` lives.
        progress: called with the number of rows of each batch once it is scored.
    """
    table = torch.as_tensor(token_bytes, dtype=torch.int64, device=device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    bpb_nats = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = torch.zeros((), dtype=torch.int64, device=device)
    n_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for x_np, y_np in batches:
        x = torch.from_numpy(x_np).to(device)
        y = torch.from_numpy(y_np).to(device)
        logits, _ = model(x)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none").double()
        valid = y.reshape(-1) != IGNORE_INDEX
        nbytes = torch.where(valid, table[y.reshape(-1).clamp(min=0)], 0)
        nats += ce.sum()
        bpb_nats += (ce * (nbytes > 0)).sum()
        n_tokens += valid.sum()
        n_bytes += nbytes.sum()
        if progress is not None:
            progress(x.size(0))
    return LossSums(float(nats.item()), int(n_tokens.item()), float(bpb_nats.item()), int(n_bytes.item()))


def text_tokens(path: Path, tokenizer: Tokenizer) -> np.ndarray:
    """The ids of a UTF-8 text file, shape ``(N,)`` int64.

    Raises:
        DataError: unreadable, not UTF-8, or fewer than 2 tokens.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--data {path}: cannot read it as UTF-8 text ({exc})") from None
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if len(ids) < 2:
        raise DataError(f"--data {path}: {len(ids)} token(s); perplexity needs at least 2")
    return ids


def _windows(tokens: np.ndarray, block_size: int, batch_size: int, limit: int | None):
    """Non-overlapping windows of ``min(block_size, N - 1)`` tokens: ``(n_windows, batches)``."""
    from lmkit.data.batching import sequential_windows

    width = min(block_size, len(tokens) - 1)
    n_windows = (len(tokens) - 1) // width
    if limit is not None:
        n_windows = min(n_windows, limit)
        tokens = tokens[: n_windows * width + 1]
    return n_windows, sequential_windows(tokens, width, batch_size)


def evaluate(ctx: EvalContext) -> TaskResult:
    """Mean loss, perplexity and bpb of the run's val split or ``ctx.data`` (a text file).

    Raises:
        DataError: the data cannot be read or rebuilt, or was tokenized differently.
    """
    from lmkit.data.batching import example_batches_in_order

    cfg = ctx.config
    block_size = cfg.model.block_size
    details: dict = {}
    notes: list[str] = []
    data_sha = None
    if ctx.data is not None:
        tokens = text_tokens(Path(ctx.data), ctx.tokenizer)
        total, batches = _windows(tokens, block_size, ctx.batch_size, ctx.limit)
        data_file, data_sha = str(ctx.data), file_sha256(Path(ctx.data))
        unit = "windows"
    else:
        from lmkit.data import prepare_data

        data = prepare_data(cfg.data)
        if data.tokenizer.fingerprint() != ctx.tokenizer.fingerprint():
            raise DataError(f"{cfg.data.dataset}: the val split rebuilt now is tokenized differently from the run's "
                            "tokenizer; pass --data FILE to score a text file with the run's tokenizer")
        data_file = f"{cfg.data.dataset} (val split)"
        if data.task == "lm":
            tokens = data.tokens("val")
            total, batches = _windows(tokens, block_size, ctx.batch_size, ctx.limit)
            unit = "windows"
        else:
            seqs = data.sequences["val"][: ctx.limit] if ctx.limit is not None else data.sequences["val"]
            pad = data.tokenizer.pad_id or 0
            total, batches, unit = len(seqs), example_batches_in_order(seqs, ctx.batch_size, pad), "examples"
    if total == 0:
        raise DataError(f"{data_file}: nothing to score")
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        ctx.progress(done, total)

    ctx.progress(0, total)
    table = token_byte_lengths(ctx.tokenizer, cfg.model.vocab_size)
    sums = loss_sums(ctx.model, batches, table, ctx.device, step)
    from lmkit.evaluation.lm import perplexity

    metrics = {"mean_loss": sums.mean_loss, "perplexity": perplexity(sums.mean_loss), "bpb": sums.bpb}
    details.update({"n_tokens": sums.n_tokens, "n_bytes": sums.n_bytes, "nats": sums.nats,
                    "bpb_nats": sums.bpb_nats, "unit": unit, "block_size": block_size,
                    "tokenizer": ctx.tokenizer.kind})
    if unit == "windows":
        notes.append(f"{total:,} non-overlapping windows of up to {block_size} tokens; the tail shorter "
                     "than a window is not scored")
    return TaskResult(task="perplexity", version=VERSION, metrics=metrics, headline="bpb", n_items=total,
                      data_file=data_file, data_sha256=data_sha, details=details, notes=notes)
