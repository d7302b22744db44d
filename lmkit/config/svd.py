"""The ``svd:`` section: adaptive-SVD training (SEEDS_SPEC section 2, seed 003).

Every ``interval`` optimizer steps the hook (:mod:`lmkit.training.svd`) analyses each target
layer from its effective weight and gradient and switches it between full training and a
frozen-principal + trainable-minor factorisation (:mod:`lmkit.models.svd_linear`).

Thresholds (SEEDS_SPEC 2.4), all in one set by ``thresholds`` and each overridable:

=================  ==========  =========  =====================================================
key                ``original``  ``adjusted``  meaning
=================  ==========  =========  =====================================================
principal_danger   0.4         0.3        principal alignment above it: go low-rank
minor_safe         0.6         0.5        minor alignment above it (and stable, safe): low-rank
angle_stable       0.1         0.15       subspace angle (radians) below it counts as stable
recon_safe         0.01        0.01       relative reconstruction error below it is safe
=================  ==========  =========  =====================================================

``original`` is the seed's Phase 1 (Nov 7); ``adjusted`` its later commit 2ddc81a (the default).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmkit.config import _Strict

#: The two threshold sets of the seed: (principal_danger, minor_safe, angle_stable, recon_safe).
THRESHOLD_SETS: dict[str, tuple[float, float, float, float]] = {
    "original": (0.4, 0.6, 0.1, 0.01),
    "adjusted": (0.3, 0.5, 0.15, 0.01),
}


class SVDConfig(_Strict):
    """Adaptive-SVD training. Off unless ``enabled``.

    Attributes:
        targets: globs (``fnmatch``) over the model's target module names
            (:meth:`lmkit.models.base.LanguageModel.target_modules`), e.g.
            ``transformer.h.0.attn.c_q`` (the seed's Phase 1) or ``transformer.h.*.attn.*``.
        interval: analyse every this many optimizer steps (the first analysis only takes
            the snapshot).
        warmup_steps: before this step every decision is "full" (``warmup_period``).
        r_min: the smallest number of minor (trainable) components.
        svd_device: where SVDs run: ``auto`` (the training device, or the CPU where the
            device has no SVD kernel, e.g. MPS), ``cpu``, or the training device's name.
        keep_optimizer_state: after a switch keep the optimizer state of parameters that did
            not change (``false``: rebuild it fresh, as the seed did).
    """

    enabled: bool = False
    targets: list[str] = Field(default_factory=lambda: ["transformer.h.0.attn.c_q"])
    interval: int = Field(20, gt=0)
    warmup_steps: int = Field(10, ge=0)
    thresholds: Literal["adjusted", "original"] = "adjusted"
    principal_danger: float | None = Field(None, ge=0.0, le=1.0)
    minor_safe: float | None = Field(None, ge=0.0, le=1.0)
    angle_stable: float | None = Field(None, ge=0.0)
    recon_safe: float | None = Field(None, ge=0.0)
    r_min: int = Field(8, gt=0)
    svd_device: str = "auto"
    keep_optimizer_state: bool = False

    def resolved_thresholds(self) -> dict[str, float]:
        """The four thresholds in effect: the ``thresholds`` set, with explicit keys winning."""
        base = dict(zip(("principal_danger", "minor_safe", "angle_stable", "recon_safe"),
                        THRESHOLD_SETS[self.thresholds], strict=True))
        for key in base:
            value = getattr(self, key)
            if value is not None:
                base[key] = float(value)
        return base


__all__ = ["THRESHOLD_SETS", "SVDConfig"]
