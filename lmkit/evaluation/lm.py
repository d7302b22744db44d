"""Language-modelling loss over a fixed set of batches."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmkit.training.device import DevicePlan

IGNORE_INDEX = -100


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
