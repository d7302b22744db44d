"""Language-modelling loss over a fixed set of batches, and the log-likelihood of
continuations given contexts (the primitive of multiple-choice tasks such as HellaSwag)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmkit.data.batching import IGNORE_INDEX
from lmkit.device import DevicePlan


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable[tuple[np.ndarray, np.ndarray]], plan: DevicePlan) -> tuple[float, int]:
    """Token-weighted mean cross-entropy (nats per target token) and the target count.

    Args:
        model: maps ids ``(B, T)`` to logits ``(B, T, V)``.
        batches: ``(x, y)`` int64 arrays ``(B, T)``; targets ``-100`` are ignored.
        plan: device and autocast policy.

    Returns:
        ``(loss, n_tokens)``; ``loss`` is ``nan`` when there are no targets.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=plan.device)
    count = torch.zeros((), dtype=torch.int64, device=plan.device)
    try:
        for x_np, y_np in batches:
            x = torch.from_numpy(x_np).to(plan.device)
            y = torch.from_numpy(y_np).to(plan.device)
            with plan.autocast():
                logits, _ = model(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
            total += loss.double()
            count += (y != IGNORE_INDEX).sum()
    finally:
        model.train(was_training)
    n = int(count.item())
    return (float(total.item()) / n if n else math.nan), n


def perplexity(loss: float) -> float:
    """``exp(loss)`` for a loss in nats; ``inf`` when it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@dataclass
class ContinuationScore:
    """Log-likelihood of one continuation given its context.

    Attributes:
        logprob: ``sum_t log p(cont_t | context, cont_<t)`` in nats (<= 0).
        n_tokens: number of continuation tokens scored.
        greedy: every continuation token is the argmax of its distribution (teacher forced).
        truncated: the context was cut from the left to fit ``block_size``.
    """

    logprob: float
    n_tokens: int
    greedy: bool
    truncated: bool


def _output_head(model: nn.Module) -> nn.Module | None:
    """The output head of a model that can return its final hidden states
    (:class:`~lmkit.models.base.LanguageModel`: ``forward(..., return_hidden=True)`` and
    ``output_head()``), so that the head runs only at the scored positions; ``None`` for
    other models (then their logits are used as they come)."""
    get_head = getattr(model, "output_head", None)
    if not callable(get_head):
        return None
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return get_head() if "return_hidden" in params else None


def _forward(model: nn.Module, head: nn.Module | None, idx: torch.Tensor, **kw) -> torch.Tensor:
    """Hidden states ``(B, T, d)`` when ``head`` is given, else logits ``(B, T, V)``."""
    out, _ = model(idx, return_hidden=True, **kw) if head is not None else model(idx, **kw)
    return out


@torch.no_grad()
def continuation_logprobs(model: nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                          block_size: int, device: torch.device, max_tokens: int = 16384,
                          max_rows: int | None = None) -> list[ContinuationScore]:
    """Score continuations given contexts, several per forward pass (teacher forcing).

    Each request ``(context_ids, continuation_ids)`` becomes one row
    ``(context + continuation)[:-1]`` predicting ``continuation``. Rows are sorted by
    length and packed into batches of at most ``max_tokens`` ids (``max_rows`` rows),
    right-padded (a causal model's earlier positions do not see the padding). The
    output head is applied only at the positions that predict continuation tokens, so a
    50k-token vocabulary costs ``len(continuation)`` head products per row, not
    ``len(row)``. A row longer than ``block_size`` keeps its last ``block_size + 1`` ids:
    the context is truncated from the left (``truncated=True``).

    Args:
        model: ``model(idx (B, T)) -> (logits (B, T, V), _)``; lmkit models (``return_hidden``
            and ``output_head()``) get the head-at-scored-positions-only path.
        requests: ``(context, continuation)`` id lists; both non-empty, the continuation at
            most ``block_size`` ids.

    Returns:
        One :class:`ContinuationScore` per request, in request order.

    Raises:
        ValueError: an empty context or continuation, or a continuation longer than ``block_size``.
    """
    rows: list[list[int]] = []
    n_cont: list[int] = []
    truncated: list[bool] = []
    for ctx_ids, cont_ids in requests:
        if not ctx_ids or not cont_ids:
            raise ValueError("continuation_logprobs: context and continuation must be non-empty")
        if len(cont_ids) > block_size:
            raise ValueError(f"continuation of {len(cont_ids)} tokens exceeds block_size {block_size}")
        full = [*ctx_ids, *cont_ids]
        truncated.append(len(full) > block_size + 1)
        rows.append(full[-(block_size + 1):])
        n_cont.append(len(cont_ids))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[ContinuationScore | None] = [None] * len(rows)
    was_training = model.training
    model.eval()
    head = _output_head(model)
    vocab = _vocab_size(model, head)
    try:
        start = 0
        while start < len(order):
            width = len(rows[order[start]]) - 1
            n = max(1, max_tokens // max(width, 1))
            if max_rows is not None:
                n = min(n, max_rows)
            batch = order[start:start + n]
            start += n
            idx = torch.zeros((len(batch), width), dtype=torch.long)
            b_idx, t_idx, targets = [], [], []
            for r, i in enumerate(batch):
                seq = rows[i]
                idx[r, : len(seq) - 1] = torch.tensor(seq[:-1])
                k = n_cont[i]
                first = len(seq) - 1 - k
                b_idx.extend([r] * k)
                t_idx.extend(range(first, first + k))
                targets.extend(seq[-k:])
            out_h = _forward(model, head, idx.to(device))
            picked = out_h[torch.tensor(b_idx, device=device), torch.tensor(t_idx, device=device)]
            tgt = torch.tensor(targets, device=device)
            logp, hit = _target_logprobs(picked, tgt, head, vocab)
            logp, hit = logp.double().cpu(), hit.cpu()
            pos = 0
            for i in batch:
                k = n_cont[i]
                out[i] = ContinuationScore(float(logp[pos:pos + k].sum()), k, bool(hit[pos:pos + k].all()),
                                           truncated[i])
                pos += k
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def _vocab_size(model: nn.Module, head: nn.Module | None) -> int | None:
    """Logits per position of ``head`` (``None`` without a head: read from the logits)."""
    if head is None:
        return None
    size = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if size else None


def _target_logprobs(picked: torch.Tensor, targets: torch.Tensor, head: nn.Module | None,
                     vocab: int | None = None, chunk_elems: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(target)`` and ``argmax == target`` per position, in chunks bounded by
    ``chunk_elems`` logits (fp32 log-softmax). ``picked`` holds hidden states when ``head`` is
    given (``vocab`` logits each), else logits."""
    vocab = vocab or picked.size(-1)
    chunk = max(1, chunk_elems // vocab)
    logps, hits = [], []
    for s in range(0, picked.size(0), chunk):
        part = picked[s:s + chunk]
        logits = (head(part) if head is not None else part).float()
        lsm = torch.log_softmax(logits, dim=-1)
        t = targets[s:s + chunk]
        logps.append(lsm.gather(1, t[:, None])[:, 0])
        hits.append(logits.argmax(dim=-1) == t)
    return torch.cat(logps), torch.cat(hits)


def supports_packing(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes explicit ``position_ids`` and a boolean ``attn_mask`` and
    the model returns hidden states for its ``output_head()`` (every lmkit model does), which
    :func:`choice_logprobs` needs to share a context between continuations."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" in params and "attn_mask" in params and _output_head(model) is not None


@torch.no_grad()
def choice_logprobs(model: nn.Module, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], *,
                    block_size: int, device: torch.device, max_tokens: int = 16384,
                    pack: bool | None = None) -> list[list[ContinuationScore]]:
    """Score several continuations of one context (multiple choice), the context computed once.

    A group ``(context, [cont_1, ..., cont_k])`` becomes one row
    ``context + cont_1 + ... + cont_k`` in which each continuation attends to the context
    and to its own earlier tokens only, and has the positions it would have right after
    the context (explicit ``position_ids`` and a block-causal ``attn_mask``). So the
    context is run once instead of ``k`` times, and the scores equal those of ``k``
    separate rows (up to float rounding). Continuations that do not fit one row of
    ``block_size`` ids go to further rows; a context too long for its longest
    continuation is truncated from the left. Rows are packed into batches of at most
    ``max_tokens`` ids, and the output head runs only where a continuation token is predicted.

    Args:
        groups: ``(context, continuations)`` id lists (all non-empty).
        pack: ``None`` packs when :func:`supports_packing`; ``False`` scores every
            continuation as its own row (:func:`continuation_logprobs`).

    Returns:
        Per group, one :class:`ContinuationScore` per continuation.
    """
    if pack is None:
        pack = supports_packing(model)
    if not pack:
        flat = [(ctx, cont) for ctx, conts in groups for cont in conts]
        scores = continuation_logprobs(model, flat, block_size=block_size, device=device, max_tokens=max_tokens)
        out, pos = [], 0
        for _, conts in groups:
            out.append(scores[pos:pos + len(conts)])
            pos += len(conts)
        return out

    # rows: (group index, context ids, [(choice index, ids)], truncated)
    rows: list[tuple[int, list[int], list[tuple[int, list[int]]], bool]] = []
    for g, (ctx_ids, conts) in enumerate(groups):
        if not ctx_ids or any(not c for c in conts):
            raise ValueError("choice_logprobs: context and continuations must be non-empty")
        longest = max(len(c) for c in conts)
        if longest >= block_size:
            raise ValueError(f"a continuation of {longest} tokens leaves no room for context in block_size {block_size}")
        ctx = list(ctx_ids)[-(block_size - longest):]
        truncated = len(ctx) < len(ctx_ids)
        current: list[tuple[int, list[int]]] = []
        used = len(ctx)
        for k, cont in enumerate(conts):
            if current and used + len(cont) > block_size:
                rows.append((g, ctx, current, truncated))
                current, used = [], len(ctx)
            current.append((k, list(cont)))
            used += len(cont)
        rows.append((g, ctx, current, truncated))

    out_groups: list[list[ContinuationScore | None]] = [[None] * len(conts) for _, conts in groups]
    length = [len(ctx) + sum(len(c) for _, c in conts) for _, ctx, conts, _ in rows]
    order = sorted(range(len(rows)), key=lambda i: -length[i])
    was_training = model.training
    model.eval()
    head = _output_head(model)
    vocab = _vocab_size(model, head)
    try:
        start = 0
        while start < len(order):
            width = length[order[start]]
            n = max(1, max_tokens // width)
            batch = order[start:start + n]
            start += n
            B = len(batch)
            idx = torch.zeros((B, width), dtype=torch.long)
            pos = torch.zeros((B, width), dtype=torch.long)
            seg = torch.full((B, width), -1, dtype=torch.long)
            b_idx, t_idx, targets, owners = [], [], [], []
            for r, i in enumerate(batch):
                g, ctx, conts, _ = rows[i]
                n_ctx = len(ctx)
                idx[r, :n_ctx] = torch.tensor(ctx)
                pos[r, :n_ctx] = torch.arange(n_ctx)
                seg[r, :n_ctx] = 0
                col = n_ctx
                for s, (k, cont) in enumerate(conts, start=1):
                    m = len(cont)
                    idx[r, col:col + m] = torch.tensor(cont)
                    pos[r, col:col + m] = torch.arange(n_ctx, n_ctx + m)
                    seg[r, col:col + m] = s
                    # token t of this continuation is predicted at the previous column of
                    # its own segment, or at the context's last column for t = 0
                    b_idx.extend([r] * m)
                    t_idx.extend([n_ctx - 1, *range(col, col + m - 1)])
                    targets.extend(cont)
                    owners.append((g, k, m, rows[i][3]))
                    col += m
            seg_d = seg.to(device)
            ar = torch.arange(width, device=device)
            causal = ar[:, None] >= ar[None, :]
            keys = seg_d[:, None, :]
            queries = seg_d[:, :, None]
            mask = causal[None] & ((keys == 0) | (keys == queries)) & (queries >= 0)
            mask |= torch.eye(width, dtype=torch.bool, device=device)[None]  # padding sees itself
            hidden = _forward(model, head, idx.to(device), position_ids=pos.to(device), attn_mask=mask[:, None])
            picked = hidden[torch.tensor(b_idx, device=device), torch.tensor(t_idx, device=device)]
            logp, hit = _target_logprobs(picked, torch.tensor(targets, device=device), head, vocab)
            logp, hit = logp.double().cpu(), hit.cpu()
            p = 0
            for g, k, m, trunc in owners:
                out_groups[g][k] = ContinuationScore(float(logp[p:p + m].sum()), m, bool(hit[p:p + m].all()), trunc)
                p += m
    finally:
        model.train(was_training)
    return out_groups  # type: ignore[return-value]
