"""Reading and steering a Backpack's senses (Hewitt, Thickstun, Manning & Liang, "Backpack
Language Models", ACL 2023, arXiv 2305.16765; SEEDS_SPEC section 4).

* :func:`word_tokens` -- a word as the model sees it in running text: ``Parliament`` is
  encoded as `` Parliament`` (the leading space of a byte-level BPE, ``Ġ``), and when the space
  is a token of its own (``char``, ``byte``) the space is dropped; a word may be several tokens.
* :func:`sense_table` -- the paper's sense tables (its section 4, "projection onto the output
  space"): for each sense ℓ of token x, the vocabulary items with the largest and smallest
  ``E·C(x)_ℓ`` (:meth:`lmkit.models.backpack.Backpack.sense_logits`).
* :func:`activation_scores` -- over a token stream, for each sense ℓ and token type, the weight
  ``w_ℓ(j) = Σ_i α_ℓ[i, j]`` that position j's sense vector receives from every later
  position of its window, combined over a type's occurrences by ``mean`` or ``max``. Early
  positions of a window are seen by more rows, so they can collect more weight.
* :func:`sense_factors` -- ``WORD:SENSE=FACTOR`` specs as the ``(V, k)`` factor table of
  :meth:`~lmkit.models.backpack.Backpack.scale_senses` (the paper's section 6 interventions).

The ``senses`` task of ``lmkit eval`` (:func:`evaluate`): a sense table per ``--word``
(``--sense-top-k`` items) and, per sense, the change of the validation loss when that sense's
weights are zeroed (``scale_senses`` with a 0 for it): how much the model relies on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmkit.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from lmkit.data.tokenizers import Tokenizer
    from lmkit.evaluation.task import EvalContext, TaskResult

VERSION = "1"
#: Metric directions: the base loss is a loss; each sense's loss change has no better value.
DIRECTIONS_BASE = {"base_loss": "lower"}


def has_senses(model: nn.Module) -> bool:
    """Whether ``model`` is a Backpack with readable senses (``sense_logits``, α, ``scale_senses``)."""
    return all(hasattr(model, name) for name in ("sense_logits", "contextualization", "scale_senses"))


def require_senses(model: nn.Module, what: str) -> None:
    """Raises:
        ConfigError: ``model`` has no senses (one line naming its type and ``what`` needed them)."""
    if not has_senses(model):
        kind = getattr(getattr(model, "config", None), "type", type(model).__name__)
        raise ConfigError(f"the model has no senses (model.type {kind}): {what} needs a backpack run")


def word_tokens(tokenizer: Tokenizer, word: str) -> list[tuple[int, str]]:
    """``[(id, piece)]``: the tokens of ``word`` as it appears after a space in running text
    (see the module docstring); ``piece`` is the decoded token (e.g. `` Parl``).

    Raises:
        ConfigError: an empty word, or one that encodes to nothing.
    """
    if not word.strip():
        raise ConfigError("--word: give a non-empty word")
    ids = tokenizer.encode(" " + word.strip())
    while len(ids) > 1 and not tokenizer.decode(ids[:1]).strip():  # the space is a token of its own
        ids = ids[1:]
    if not ids:
        raise ConfigError(f"--word {word!r}: the tokenizer gives no tokens for it")
    return [(int(i), tokenizer.decode([int(i)])) for i in ids]


def frequent_word_tokens(tokens: np.ndarray, tokenizer: Tokenizer, n: int) -> list[int]:
    """The ``n`` most frequent ids of ``tokens`` that are words: they decode to a space
    followed by a letter or digit (a word start of a byte-level BPE, `` the``), or, when no
    token of ``tokens`` starts with a space (``char``, ``byte``, Metaspace pieces), to
    something with a letter or digit; special tokens excluded. Most frequent first (ties:
    lower id)."""
    if n <= 0 or len(tokens) == 0:
        return []
    counts = np.bincount(np.asarray(tokens, dtype=np.int64))
    special = tokenizer.special_ids()
    present = [int(i) for i in np.lexsort((np.arange(len(counts)), -counts)) if counts[i] > 0 and int(i) not in special]
    pieces = {i: tokenizer.decode([i]) for i in present}
    spaced = [i for i in present if re.match(r"\s+\w", pieces[i])]
    return (spaced or [i for i in present if re.search(r"\w", pieces[i])])[:n]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sense_table(model: nn.Module, tokenizer: Tokenizer, token_id: int, top_k: int) -> list[dict[str, Any]]:
    """Per sense ℓ of ``token_id``: ``{"sense", "top", "top_scores", "bottom", "bottom_scores"}``,
    the ``top_k`` vocabulary pieces with the largest ``E·C(x)_ℓ`` (descending) and the ``top_k``
    with the smallest (ascending), scores as floats (logit units). Call in eval mode."""
    logits = model.sense_logits(torch.tensor([token_id], device=_device(model)))[0].float()  # (k, V)
    k = min(top_k, logits.size(-1))
    top = logits.topk(k, dim=-1)
    bottom = (-logits).topk(k, dim=-1)
    rows = []
    for sense in range(logits.size(0)):
        rows.append({"sense": sense,
                     "top": [tokenizer.decode([int(i)]) for i in top.indices[sense]],
                     "top_ids": [int(i) for i in top.indices[sense]],
                     "top_scores": [float(v) for v in top.values[sense]],
                     "bottom": [tokenizer.decode([int(i)]) for i in bottom.indices[sense]],
                     "bottom_ids": [int(i) for i in bottom.indices[sense]],
                     "bottom_scores": [float(-v) for v in bottom.values[sense]]})
    return rows


@torch.no_grad()
def activation_scores(model: nn.Module, tokens: np.ndarray, block_size: int, batch_size: int = 8,
                      reduce: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Per sense and token type, the weight ``Σ_i α_ℓ[i, j]`` its occurrences receive.

    Args:
        model: a Backpack in eval mode.
        tokens: ``(N,)`` ids, cut into non-overlapping windows of ``min(block_size, N)``
            tokens (a shorter tail is dropped unless it is the only window).
        reduce: ``mean`` or ``max`` over a type's occurrences.

    Returns:
        ``(scores (k, V) float32, counts (V,) int64)``; types that never occur score 0.
    """
    V, k = model.config.vocab_size, model.config.n_senses
    device = _device(model)
    tokens = np.asarray(tokens, dtype=np.int64)
    width = min(block_size, len(tokens))
    n_windows = max(1, len(tokens) // width) if width else 0
    total = torch.zeros(k, V, dtype=torch.float64, device=device)
    best = torch.zeros(k, V, dtype=torch.float32, device=device)
    counts = torch.zeros(V, dtype=torch.int64, device=device)
    for first in range(0, n_windows, batch_size):
        rows = range(first, min(first + batch_size, n_windows))
        x = torch.from_numpy(np.stack([tokens[r * width : (r + 1) * width] for r in rows])).to(device)
        alpha = model.contextualization(x)  # (b, k, T, T)
        received = alpha.sum(-2).transpose(0, 1).reshape(k, -1)  # (k, b*T): Σ_i α_ℓ[i, j]
        flat = x.reshape(-1)
        total.index_add_(1, flat, received.double())
        best.scatter_reduce_(1, flat.expand(k, -1), received, reduce="amax")
        counts += torch.bincount(flat, minlength=V)
    if reduce == "max":
        return best, counts
    return (total / counts.clamp(min=1)).float(), counts


def top_activating(scores: torch.Tensor, counts: torch.Tensor, top_k: int, min_count: int = 1
                   ) -> list[tuple[list[int], list[float]]]:
    """Per sense, the ``top_k`` ids by score among types seen at least ``min_count`` times."""
    masked = scores.masked_fill((counts < min_count).unsqueeze(0), float("-inf"))
    k = min(top_k, int((counts >= min_count).sum()))
    if k == 0:
        return [([], []) for _ in range(scores.size(0))]
    top = masked.topk(k, dim=-1)
    return [([int(i) for i in top.indices[s]], [float(v) for v in top.values[s]]) for s in range(scores.size(0))]


def parse_sense_scale(spec: str) -> tuple[str, int, float]:
    """``"WORD:SENSE=FACTOR"`` -> ``(word, sense, factor)``.

    Raises:
        ConfigError: not of that form, a negative sense, or a non-finite factor.
    """
    match = re.fullmatch(r"(.+):(\d+)=(.+)", spec.strip())
    if not match:
        raise ConfigError(f"--sense-scale {spec!r}: expected WORD:SENSE=FACTOR, e.g. bank:3=0")
    try:
        factor = float(match.group(3))
    except ValueError:
        factor = math.nan
    if not math.isfinite(factor):
        raise ConfigError(f"--sense-scale {spec!r}: FACTOR must be a finite number")
    return match.group(1), int(match.group(2)), factor


def sense_factors(model: nn.Module, tokenizer: Tokenizer, specs: Iterable[str]) -> torch.Tensor:
    """The ``(V, k)`` factor table of ``WORD:SENSE=FACTOR`` specs: ones, with ``FACTOR`` at
    (each token of WORD, SENSE); a later spec for the same cell wins.

    Raises:
        ConfigError: a bad spec, or a sense outside ``0..k-1``.
    """
    V, k = model.config.vocab_size, model.config.n_senses
    factors = torch.ones(V, k)
    for spec in specs:
        word, sense, factor = parse_sense_scale(spec)
        if sense >= k:
            raise ConfigError(f"--sense-scale {spec!r}: the model has senses 0..{k - 1}")
        for token_id, _ in word_tokens(tokenizer, word):
            factors[token_id, sense] = factor
    return factors


def steering(ctx: EvalContext, task: str) -> AbstractContextManager:
    """The ``--sense-scale`` intervention around a task (``sample``, ``perplexity``), or a
    no-op without the option.

    Raises:
        ConfigError: the option with another task, or on a model without senses.
    """
    specs = ctx.options.get("sense_scale") or []
    if not specs:
        return nullcontext()
    if task not in ("sample", "perplexity"):
        raise ConfigError(f"--sense-scale applies to --task sample or perplexity, not {task}")
    require_senses(ctx.model, "--sense-scale")
    return ctx.model.scale_senses(sense_factors(ctx.model, ctx.tokenizer, specs))


def _val_windows(ctx: EvalContext) -> tuple[Any, str, str | None]:
    """The batches of the validation stream the zeroing is scored on, with their source."""
    from lmkit.data import prepare_data
    from lmkit.evaluation.perplexity import scored_windows, text_tokens
    from lmkit.evaluation.task import file_sha256

    block = ctx.config.model.block_size
    if ctx.data is not None:
        tokens, nbytes, _ = text_tokens(Path(ctx.data), ctx.tokenizer, ctx.options.get("encoding", "utf-8"))
        source, sha = str(ctx.data), file_sha256(Path(ctx.data))
    else:
        data = prepare_data(ctx.config.data, added_tokens=getattr(ctx.tokenizer, "added_tokens", ()))
        if data.task != "lm":
            raise ConfigError("--task senses scores the loss on a text run's val split; pass --data FILE")
        tokens, nbytes = data.tokens("val"), data.token_bytes("val")
        source, sha = f"{ctx.config.data.dataset} (val split)", data.text_sha256("val")
    _, batches = scored_windows(tokens, nbytes, block, ctx.batch_size, limit=ctx.limit)
    return list(batches), source, sha


def evaluate(ctx: EvalContext) -> TaskResult:
    """Sense tables for ``--word`` (``ctx.options["word"]``, list) and the loss change of zeroing
    each sense, on the run's val split (or ``--data``; ``--limit`` windows).

    Raises:
        ConfigError: the model has no senses; no ``--word``; a ``sense_top_k`` < 1.
    """
    from lmkit.evaluation.perplexity import byte_tables, loss_sums
    from lmkit.evaluation.task import TaskResult

    model, tok = ctx.model, ctx.tokenizer
    require_senses(model, "--task senses")
    words = ctx.options.get("word") or []
    if isinstance(words, str):
        words = [words]
    if not words:
        raise ConfigError("--task senses: give one or more --word WORD")
    top_k = ctx.options.get("sense_top_k") or 10
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"--sense-top-k must be an integer >= 1, got {top_k!r}")
    tables = [{"word": w, "tokens": [{"token_id": i, "token": piece, "senses": sense_table(model, tok, i, top_k)}
                                     for i, piece in word_tokens(tok, w)]} for w in words]
    batches, source, sha = _val_windows(ctx)
    k = model.config.n_senses
    ctx.progress(0, k + 1)
    table, _ = byte_tables(tok, model.config.vocab_size)
    base = loss_sums(model, batches, table, ctx.device).mean_loss
    ctx.progress(1, k + 1)
    zeroed = []
    for sense in range(k):
        factors = torch.ones(k)
        factors[sense] = 0.0
        with model.scale_senses(factors):
            loss = loss_sums(model, batches, table, ctx.device).mean_loss
        zeroed.append({"sense": sense, "loss": loss, "delta": loss - base})
        ctx.progress(sense + 2, k + 1)
    metrics = {"base_loss": base, **{f"zero_sense_{z['sense']}_delta": z["delta"] for z in zeroed}}
    n_tokens = sum(int((b[1] != -100).sum()) for b in batches)
    return TaskResult(
        task="senses", version=VERSION, metrics=metrics, headline="base_loss",
        n_items=sum(len(b[0]) for b in batches),
        data_file=source, data_sha256=sha,
        directions={**DIRECTIONS_BASE, **{m: "neither" for m in metrics if m != "base_loss"}},
        details={"sense_top_k": top_k, "n_senses": k, "words": tables, "zeroed": zeroed, "n_tokens": n_tokens},
        notes=[f"zero_sense_L_delta: the val loss (nats/token, {n_tokens:,} tokens) with sense L's weights "
               "α_L zeroed, minus the loss without intervention (larger = the model relies more on that sense)"],
    )


__all__ = ["activation_scores", "evaluate", "frequent_word_tokens", "has_senses", "parse_sense_scale",
           "require_senses", "sense_factors", "sense_table", "steering", "top_activating", "word_tokens"]
