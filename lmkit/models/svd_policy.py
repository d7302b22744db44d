"""The adaptive-SVD policy of seed 003: metrics, r update and decision (SEEDS_SPEC 2.2-2.4).

Pure functions on tensors (float32, on the tensors' device; small SVDs routed like
:func:`lmkit.models.svd_linear.svd`) plus :func:`analyse`, which reads one
:class:`~lmkit.models.svd_linear.AdaptiveSVDLinear` and returns what the driver should do
without doing it. Notation: ``W = U diag(S) Vh`` the thin SVD of the effective weight (out x in),
``g = len(S)``, ``r`` the minor (trainable) components, ``k = g - r`` the principal ones, ``G`` the
gradient of the effective weight (out x in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lmkit.config.svd import THRESHOLD_SETS
from lmkit.errors import ConfigError
from lmkit.models.svd_linear import AdaptiveSVDLinear, SVDTriple, svd, svdvals

__all__ = ["DEFAULT_PRINCIPAL", "ENERGY_LEVELS", "REASONS", "THRESHOLD_KEYS", "Analysis", "analyse", "decide",
           "default_r", "energy_rank", "largest_principal_angle", "layer_metrics", "next_r"]

#: With ``r`` unset only the top this many directions count as principal (``r = g - 10``).
DEFAULT_PRINCIPAL = 10
#: Energy levels of the ``energy_rank_*`` metrics (suffix: the digits after the point).
ENERGY_LEVELS = {"90": 0.9, "99": 0.99, "999": 0.999}
#: The four thresholds :func:`decide` reads (:meth:`lmkit.config.svd.SVDConfig.resolved_thresholds`).
THRESHOLD_KEYS = ("principal_danger", "minor_safe", "angle_stable", "recon_safe")
#: Every reason an :class:`Analysis` can give.
REASONS = ("warmup_period", "gradient_clobbering_risk", "optimal_lowrank_conditions", "reconstruction_unsafe",
           "continue_current_mode", "initial_svd_computation", "no_gradient_yet", "invalid_gradient",
           "invalid_weight")


def default_r(g: int) -> int:
    """``r`` when a layer has none yet: ``g - 10`` (only the top 10 directions are principal,
    SEEDS_SPEC 2.2), kept in ``[1, g - 1]`` for layers with ``g <= 10``."""
    return max(1, min(g - DEFAULT_PRINCIPAL, g - 1))


def energy_rank(S: torch.Tensor, p: float) -> int:
    """The smallest ``n`` with ``sum(S[:n]^2) >= p * sum(S^2)``, computed as the seed did:
    ``#{i : cumsum(S^2)_i < p * total} + 1`` (SEEDS_SPEC 2.2), at most ``len(S)``."""
    energy = S.float() ** 2
    cum = torch.cumsum(energy, 0)
    return min(int((cum < p * energy.sum()).sum()) + 1, S.numel())


def largest_principal_angle(A: torch.Tensor, B: torch.Tensor, device: str = "auto") -> float:
    """The largest principal angle (radians, in ``[0, pi/2]``) between ``span(A)`` and
    ``span(B)``, both m x k with orthonormal columns (SEEDS_SPEC 2.2: ``arccos`` of the smallest
    singular value of ``A^T B``).

    Small angles use the sine form ``arcsin ||B - A A^T B||_2`` instead (the same angle, Bjorck &
    Golub 1973), since ``arccos`` near 1 resolves only ~3e-4 rad in float32; the switch is at
    pi/4, as in ``scipy.linalg.subspace_angles``.
    """
    A, B = A.float(), B.float()
    M = A.T @ B
    cos_min = float(svdvals(M, device).min().clamp(-1.0, 1.0))
    sin_max = float(svdvals(B - A @ M, device).max().clamp(0.0, 1.0))
    if sin_max < math.sqrt(0.5):
        return math.asin(sin_max)
    return math.acos(cos_min)


def layer_metrics(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, G: torch.Tensor | None, r: int | None,
                  snapshot: SVDTriple | None = None, *, svd_device: str = "auto") -> dict[str, float]:
    """The metrics of SEEDS_SPEC 2.2 for one layer.

    Args:
        U, S, Vh: thin SVD of the current effective weight: (out x g), (g,), (g x in).
        G: gradient of the effective weight (out x in), or ``None`` (no alignment metrics).
        r: minor components; ``None`` -> :func:`default_r` (``g - 10``). ``k = g - r``.
        snapshot: ``(U_prev, S_prev, Vh_prev)`` of the last snapshot, or ``None`` (no angle).
        svd_device: where the small SVDs of the angle run (:func:`~lmkit.models.svd_linear.svd`).

    Returns:
        ``subspace_angle``: largest principal angle between ``span(U_prev[:, :k])`` and
        ``span(U[:, :k])`` (left singular vectors: output directions), radians; only with a
        snapshot of the same shape. ``principal_alignment`` = ``||U_k U_k^T G||_F / ||G||_F``,
        ``minor_alignment`` the same with ``U_m = U[:, k:]`` (norm ratios, not squared: when
        ``out <= in``, ``p^2 + m^2 = 1``; 0 for a zero gradient); ``grad_norm`` = ``||G||_F``.
        ``reconstruction_error`` = ``||W - W_k||_F / ||W||_F`` = ``sqrt(sum S[k:]^2 / sum S^2)``
        with ``W_k`` the top-k truncation. ``energy_rank_90`` / ``_99`` / ``_999``
        (:func:`energy_rank`).

    Raises:
        ValueError: ``r`` outside ``[1, g - 1]``, or ``G`` not of ``W``'s shape.
    """
    g = S.numel()
    r = default_r(g) if r is None else int(r)
    if not 1 <= r <= g - 1:
        raise ValueError(f"r must be in [1, {g - 1}], got {r}")
    k = g - r
    S = S.float()
    energy = S**2
    total = float(energy.sum())
    metrics: dict[str, float] = {}
    if snapshot is not None and tuple(snapshot[0].shape) == tuple(U.shape):
        metrics["subspace_angle"] = largest_principal_angle(snapshot[0][:, :k].to(U.device), U[:, :k], svd_device)
    if G is not None:
        shape = (U.shape[0], Vh.shape[1])
        if tuple(G.shape) != shape:
            raise ValueError(f"gradient shape {tuple(G.shape)} is not the weight's {shape}")
        Gf = G.detach().to(device=U.device, dtype=torch.float32)
        norm = float(torch.linalg.matrix_norm(Gf))
        Uf = U.float()
        # ||U_k U_k^T G||_F = ||U_k^T G||_F: U_k has orthonormal columns.
        p = float(torch.linalg.matrix_norm(Uf[:, :k].T @ Gf))
        m = float(torch.linalg.matrix_norm(Uf[:, k:].T @ Gf))
        metrics["principal_alignment"] = p / norm if norm > 0 else 0.0
        metrics["minor_alignment"] = m / norm if norm > 0 else 0.0
        metrics["grad_norm"] = norm
    metrics["reconstruction_error"] = math.sqrt(max(float(energy[k:].sum()), 0.0) / total) if total > 0 else 0.0
    for suffix, p_level in ENERGY_LEVELS.items():
        metrics[f"energy_rank_{suffix}"] = float(energy_rank(S, p_level))
    return metrics


def next_r(S: torch.Tensor, S_prev: torch.Tensor | None, r: int | None, r_min: int = 8) -> int:
    """The next ``r`` (SEEDS_SPEC 2.3, the seed's ``determine_next_r``), clamped to
    ``[r_min, g - 1]`` (``g - 1`` wins when ``r_min > g - 1``).

    With a previous spectrum of the same length: ``b = min(r, g // 4)``, ``rel =
    ||S[-b:] - S_prev[-b:]|| / (||S_prev[-b:]|| + 1e-10)``; ``rel > 0.1`` (the minor components
    are changing) -> ``max(r, int(1.2 r))``, else ``int(0.8 r)``. Without one: ``min(g - argmax_i
    S_i / (S_{i+1} + 1e-10), g - energy_rank(S, 0.999), g // 2)`` (spectral-gap and energy
    heuristics). ``r`` ``None`` -> ``g - 10``.
    """
    g = S.numel()
    r = default_r(g) if r is None else int(r)
    S = S.float()
    b = min(r, g // 4)
    if S_prev is not None and S_prev.numel() == g and b >= 1:
        prev = S_prev.float().to(S.device)[-b:]
        rel = float(torch.linalg.vector_norm(S[-b:] - prev)) / (float(torch.linalg.vector_norm(prev)) + 1e-10)
        r_next = max(r, int(r * 1.2)) if rel > 0.1 else int(r * 0.8)
    else:
        natural_cutoff = g - int(torch.argmax(S[:-1] / (S[1:] + 1e-10))) if g > 1 else g
        r_energy = g - energy_rank(S, 0.999)
        r_next = min(natural_cutoff, r_energy, g // 2)
    return min(max(r_min, r_next), g - 1)


def _resolve(thresholds: dict[str, float] | None) -> dict[str, float]:
    if thresholds is None:
        return dict(zip(THRESHOLD_KEYS, THRESHOLD_SETS["adjusted"], strict=True))
    missing = [key for key in THRESHOLD_KEYS if key not in thresholds]
    if missing:
        raise ConfigError(f"svd thresholds: missing {', '.join(missing)} (need {', '.join(THRESHOLD_KEYS)})")
    return {key: float(thresholds[key]) for key in THRESHOLD_KEYS}


def decide(metrics: dict[str, float], step: int, thresholds: dict[str, float] | None = None,
           warmup_steps: int = 10) -> tuple[str | None, str]:
    """The decision rule of SEEDS_SPEC 2.4 (the seed's ``should_use_lowrank_training``):
    ``(want, reason)`` with ``want`` ``"lowrank"``, ``"full"`` or ``None`` (keep the mode).

    In priority order: ``step < warmup_steps`` -> full, ``warmup_period``;
    ``principal_alignment > principal_danger`` -> lowrank, ``gradient_clobbering_risk``;
    ``subspace_angle < angle_stable`` and ``minor_alignment > minor_safe`` and
    ``reconstruction_error < recon_safe`` -> lowrank, ``optimal_lowrank_conditions``;
    ``reconstruction_error >= recon_safe`` -> full, ``reconstruction_unsafe``; otherwise
    ``None``, ``continue_current_mode``. A metric that is absent (no snapshot: no angle; no
    gradient: no alignments) never satisfies its condition.

    Args:
        metrics: :func:`layer_metrics`.
        thresholds: the four of :data:`THRESHOLD_KEYS`; ``None``: the ``adjusted`` set.

    Raises:
        ConfigError: a threshold is missing.
    """
    if step < warmup_steps:
        return "full", "warmup_period"
    t = _resolve(thresholds)
    nan = float("nan")  # comparisons with NaN are false
    principal = metrics.get("principal_alignment", nan)
    minor = metrics.get("minor_alignment", nan)
    angle = metrics.get("subspace_angle", nan)
    recon_ok = metrics.get("reconstruction_error", nan) < t["recon_safe"]
    if principal > t["principal_danger"]:
        return "lowrank", "gradient_clobbering_risk"
    if angle < t["angle_stable"] and minor > t["minor_safe"] and recon_ok:
        return "lowrank", "optimal_lowrank_conditions"
    if not recon_ok:
        return "full", "reconstruction_unsafe"
    return None, "continue_current_mode"


@dataclass
class Analysis:
    """What :func:`analyse` found for one layer.

    Attributes:
        mode: the layer's mode (``"full"`` | ``"lowrank"``) at the analysis.
        r: its ``r`` (``None``: unset; the metrics then used ``g - 10``).
        r_next: the proposed ``r`` (:func:`next_r`); the layer's ``r`` when no decision was made.
        metrics: :func:`layer_metrics` (empty without an SVD).
        want: ``"lowrank"`` | ``"full"`` | ``None`` (keep).
        reason: one of :data:`REASONS`.
        svd: ``(U, S, Vh)`` of the effective weight analysed, or ``None``; pass it as ``svd=`` to
            the layer's methods to skip a second SVD of an unchanged weight.
    """

    mode: str
    r: int | None
    r_next: int | None
    metrics: dict[str, float]
    want: str | None
    reason: str
    svd: SVDTriple | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The fields without ``svd``, JSON-ready."""
        return {"mode": self.mode, "r": self.r, "r_next": self.r_next, "metrics": dict(self.metrics),
                "want": self.want, "reason": self.reason}


def analyse(layer: AdaptiveSVDLinear, step: int, thresholds: dict[str, float] | None = None, warmup_steps: int = 10,
            r_min: int = 8, svd_device: str = "auto") -> Analysis:
    """Analyse one layer from its effective weight and gradient (SEEDS_SPEC 2.2-2.4); acts on
    nothing (the driver switches, re-factors and takes the snapshot with the layer's methods).

    Reasons beyond :func:`decide`'s: ``initial_svd_computation`` (no snapshot yet: the metrics
    that need none are computed, no decision), ``no_gradient_yet`` (``effective_grad()`` is
    ``None``), ``invalid_gradient`` (NaN/Inf in it), ``invalid_weight`` (NaN/Inf in the
    effective weight: no SVD is possible). Only the decision cases propose a new ``r``.
    """
    mode, r = layer.mode, layer.r
    W = layer.effective_weight()
    if not bool(torch.isfinite(W).all()):
        return Analysis(mode, r, r, {}, None, "invalid_weight")
    G = layer.effective_grad()
    grad_ok = G is not None and bool(torch.isfinite(G).all())
    snapshot = layer.snapshot
    if snapshot is None:
        U, S, Vh = svd(W, svd_device)
        metrics = layer_metrics(U, S, Vh, G if grad_ok else None, r, svd_device=svd_device)
        return Analysis(mode, r, r, metrics, None, "initial_svd_computation", (U, S, Vh))
    if G is None:
        return Analysis(mode, r, r, {}, None, "no_gradient_yet")
    if not grad_ok:
        return Analysis(mode, r, r, {}, None, "invalid_gradient")
    U, S, Vh = svd(W, svd_device)
    metrics = layer_metrics(U, S, Vh, G, r, snapshot, svd_device=svd_device)
    want, reason = decide(metrics, step, thresholds, warmup_steps)
    r_next = next_r(S, snapshot[1], r, r_min)
    return Analysis(mode, r, r_next, metrics, want, reason, (U, S, Vh))
