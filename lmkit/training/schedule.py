"""Learning-rate schedules, as multipliers of the peak ``training.lr``.

With ``s`` the number of optimizer steps taken so far, ``W`` warmup steps, ``S`` total
steps and ``m = min_lr_ratio`` (SEEDS_SPEC 5.2, the LambdaLR form used by seeds 000
and 001 and by HF ``get_cosine_schedule_with_warmup``)::

    s < W:      mult = s / W                                   (linear warmup from 0)
    cosine:     mult = m + (1 - m) * 0.5 * (1 + cos(pi * p))   p = (s - W) / (S - W), clamped to [0, 1]
    linear:     mult = m + (1 - m) * (1 - p)                   (seed 000: m = 0, linear decay to 0)
    constant:   mult = 1

Example: W=5, S=20, m=0.1 gives mult(10) = 0.775 for cosine. The schedule is a
``torch.optim.lr_scheduler.LambdaLR`` stepped exactly once per optimizer step.
"""

from __future__ import annotations

import functools
import math

import torch

SCHEDULES = ("cosine", "linear", "constant")


def lr_multiplier(step: int, *, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The multiplier of the peak LR after ``step`` optimizer steps (formulas above).

    Raises:
        ValueError: unknown ``schedule``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)  # linear


def build_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_multiplier`; ``scheduler.last_epoch`` counts its steps."""
    fn = functools.partial(lr_multiplier, schedule=schedule, warmup_steps=warmup_steps,
                           total_steps=total_steps, min_lr_ratio=min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
