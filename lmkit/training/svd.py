"""The adaptive-SVD training hook (SEEDS_SPEC section 2; seed 003). Driver written by the lead."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from lmkit.config.svd import SVDConfig
    from lmkit.training.hooks import TrainingHook
    from lmkit.training.loop import Trainer


def build_hook(config: SVDConfig, trainer: Trainer) -> TrainingHook | None:
    """The hook for the ``svd:`` section, or ``None`` when ``svd.enabled`` is false."""
    if not config.enabled:
        return None
    raise NotImplementedError("adaptive SVD training is being built")
