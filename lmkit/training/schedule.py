"""Learning-rate schedules, as multipliers of the peak ``training.lr``.

With ``s`` the number of optimizer steps taken so far (``s = 0`` for the first step),
``W`` warmup steps, ``S`` total steps and ``m = min_lr_ratio``::

    s < W, warmup_form "s/W":      mult = s / W         LR 0 at the first step, peak at step W+1
    s < W, warmup_form "(s+1)/W":  mult = (s + 1) / W   LR peak/W at the first step, peak at step W
    cosine:     mult = m + (1 - m) * 0.5 * (1 + cos(pi * p))   p = (s - W) / (S - W), clamped to [0, 1]
    linear:     mult = m + (1 - m) * (1 - p)                   (the arithmetic presets: m = 0, linear decay to 0)
    constant:   mult = 1
    warmdown:   mult = 1 for s <= S - D, else q + (1 - q) * m  with q = (S - s) / D, D = round(r * S)

``warmdown`` is nanochat's ``get_lr_multiplier`` (karpathy/nanochat ``scripts/base_train.py``):
constant after the warmup, then a linear ramp over the last ``D = round(warmdown_ratio * S)``
steps towards ``m`` (nanochat's ``final_lr_frac``; 0 in nanochat, so the LR of the last step is
``peak / D``, never exactly 0). nanochat's warmup is ``(s + 1) / W`` with ``W = round(warmup_ratio
* S)``: here ``warmup_steps`` with ``warmup_form "(s+1)/W"`` (``nanochat-d4`` has no warmup).
Python's ``round`` (half to even) is nanochat's too.

The two warmup forms (``training.warmup_form``; every shipped preset sets it):

- ``"s/W"``: the ``LambdaLR`` form of HF ``get_cosine_schedule_with_warmup`` (SEEDS_SPEC
  5.2, 3.4), used by the parenthesised-arithmetic presets (``pilot``, ``scale_10m``,
  Step-free-arithmetic-transformers) and the WikiText GPT presets (``tiny``/``small``/
  ``medium``, oonisim/python-programs ``train_lm.py``). The first step trains with LR 0.
- ``"(s+1)/W"``: nanoGPT / build-nanogpt's ``get_lr`` (SEEDS_SPEC 1.8), used by the
  ``gpt2-124m`` preset (zhengpu-berkeley/domain-token-gpt2). The default for configs that
  do not say (new presets): no step is wasted at LR 0.

Example: W=5, S=20, m=0.1 gives mult(10) = 0.775 for cosine under both forms (they differ
only while ``s < W``). The schedule is a ``torch.optim.lr_scheduler.LambdaLR`` stepped
exactly once per optimizer step.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

SCHEDULES = ("cosine", "linear", "constant", "warmdown")
#: nanochat's ``warmdown_ratio``: the fraction of the steps the ``warmdown`` schedule ramps down over.
DEFAULT_WARMDOWN_RATIO = 0.2
WarmupForm = Literal["s/W", "(s+1)/W"]
WARMUP_FORMS: tuple[str, ...] = ("s/W", "(s+1)/W")
#: The form of runs whose config predates ``training.warmup_form`` (the only form lmkit had).
LEGACY_WARMUP_FORM = "s/W"


def lr_multiplier(step: int, *, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float,
                  warmup_form: str = LEGACY_WARMUP_FORM, warmdown_ratio: float = DEFAULT_WARMDOWN_RATIO) -> float:
    """The multiplier of the peak LR after ``step`` optimizer steps (formulas above).

    ``warmup_form`` defaults to ``"s/W"`` here, the behaviour of callers written before the
    field existed; :class:`lmkit.config.TrainConfig` defaults to ``"(s+1)/W"``.
    ``warmdown_ratio`` is read by the ``warmdown`` schedule only.

    Raises:
        ValueError: unknown ``schedule`` or ``warmup_form``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
    if warmup_form not in WARMUP_FORMS:
        raise ValueError(f"unknown warmup_form {warmup_form!r} (known: {', '.join(WARMUP_FORMS)})")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps if warmup_form == "(s+1)/W" else step / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "warmdown":
        warmdown = round(warmdown_ratio * total_steps)
        if warmdown <= 0 or step <= total_steps - warmdown:
            return 1.0
        left = max(0.0, (total_steps - step) / warmdown)  # clamped only past the last step
        return left * 1.0 + (1.0 - left) * min_lr_ratio
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)  # linear


def steps_to_peak(warmup_steps: int, warmup_form: str = LEGACY_WARMUP_FORM) -> int:
    """The 1-based optimizer step that first trains at the peak LR: ``W + 1`` for ``"s/W"``,
    ``W`` for ``"(s+1)/W"`` (1 without warmup)."""
    if warmup_steps <= 0:
        return 1
    return warmup_steps if warmup_form == "(s+1)/W" else warmup_steps + 1


def build_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float, warmup_form: str = LEGACY_WARMUP_FORM,
                    warmdown_ratio: float = DEFAULT_WARMDOWN_RATIO) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_multiplier`; ``scheduler.last_epoch`` counts its steps. Every
    param group is scaled by the same multiplier of its own initial LR (the ``muon`` optimizer's
    Muon and AdamW groups included).

    Raises:
        ValueError: unknown ``schedule`` or ``warmup_form``.
    """
    if warmup_form not in WARMUP_FORMS:
        raise ValueError(f"unknown warmup_form {warmup_form!r} (known: {', '.join(WARMUP_FORMS)})")
    fn = functools.partial(lr_multiplier, schedule=schedule, warmup_steps=warmup_steps,
                           total_steps=total_steps, min_lr_ratio=min_lr_ratio, warmup_form=warmup_form,
                           warmdown_ratio=warmdown_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
