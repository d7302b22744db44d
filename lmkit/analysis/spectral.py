"""Spectral metrics of one weight matrix, and of the change between two versions of it.

Everything takes a 2-D weight ``W`` of shape ``(m, n)`` (as stored: ``(out, in)`` for a linear
layer, ``(vocab, d)`` for an embedding table) or its singular values ``s`` (``g = min(m, n)``
of them, descending, float32 from :func:`torch.linalg.svdvals`). "Left" singular vectors are
the columns of ``U`` in ``W = U diag(s) Vᵀ``: the output space of a linear layer.

* :func:`spectrum_metrics` -- ranks and norms from ``s`` alone: effective rank (Roy & Vetterli
  2007), stable rank, energy ranks, condition number, and the heavy-tailed metrics of
  WeightWatcher (Martin & Mahoney 2021): the power-law exponent ``alpha`` of the eigenvalues
  ``λ = s²`` of ``WᵀW`` fitted with the ``powerlaw`` package (:func:`fit_powerlaw`),
  ``alpha_weighted``, ``log_spectral_norm``, ``log_norm`` and the MP soft rank
  (:func:`mp_soft_rank`).
* :class:`LeftSubspaces`, :func:`largest_principal_angle`, :func:`delta_in_subspace` --
  the subspace comparisons between consecutive checkpoints.

WeightWatcher conventions followed (weightwatcher 0.7.x ``WeightWatcher.analyze`` defaults):
the eigenvalues are ``s²`` *without* the ``1/N`` normalisation (``normalize`` was removed from
``analyze`` in 0.6.5; ``combined_eigenvalues`` has the division commented out), eigenvalues
``<= 1e-5`` are left out of the fit (``EVALS_THRESH``), ``xmin`` is searched (``xmin=None``),
``xmax=None``, ``fix_fingers=False``, and no fit below 8 eigenvalues (``min_evals=8``).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from typing import Any

import numpy as np
import torch

#: WeightWatcher's ``EVALS_THRESH``: eigenvalues at or below it are not fitted.
EVALS_THRESH = 1e-5
#: WeightWatcher's ``DEFAULT_MIN_EVALS``: layers with fewer eigenvalues get no fit.
MIN_EVALS = 8
#: The energy ranks (:func:`energy_rank`) reported per matrix: key -> fraction of Σ s².
ENERGY_RANKS = {"energy_rank_90": 0.9, "energy_rank_99": 0.99, "energy_rank_999": 0.999}


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.svdvals`` of ``weight`` in float32 on the CPU, descending, shape ``(g,)``.
    A 50,304 x 768 matrix takes about a second on one CPU core."""
    return torch.linalg.svdvals(weight.detach().to("cpu", torch.float32))


def effective_rank(s: np.ndarray | torch.Tensor) -> float:
    """Roy & Vetterli (2007), "The effective rank: a measure of effective dimensionality", eq. (1)-(2):
    ``exp(H(p))`` with ``p_i = s_i / Σ s_j`` (singular values normalised to sum 1, *not* squared)
    and ``H`` the Shannon entropy in nats (``0 log 0 = 0``). In ``[1, g]``; 0 for a zero matrix."""
    s = np.asarray(s, dtype=np.float64)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def stable_rank(s: np.ndarray | torch.Tensor) -> float:
    """``‖W‖_F² / ‖W‖_2² = Σ s_i² / s_max²`` (Rudelson & Vershynin 2007; WeightWatcher's
    ``stable_rank``). In ``[1, g]``; 0 for a zero matrix."""
    s = np.asarray(s, dtype=np.float64)
    top = float(s.max()) if s.size else 0.0
    return float((s**2).sum() / top**2) if top > 0 else 0.0


def energy_rank(s: np.ndarray | torch.Tensor, fraction: float) -> int:
    """The smallest ``n`` whose top-``n`` components hold ``fraction`` of the energy ``Σ s²``
    (SEEDS_SPEC 2.2: ``#{cumsum(s²) < fraction·Σ s²} + 1``, at most ``g``); 0 for a zero matrix."""
    s = np.asarray(s, dtype=np.float64)
    energy = np.cumsum(s**2)
    if not energy.size or energy[-1] <= 0:
        return 0
    return int(min(s.size, int((energy < fraction * energy[-1]).sum()) + 1))


def fit_powerlaw(evals: np.ndarray) -> dict[str, Any]:
    """Fit a power law ``p(λ) ∝ λ^-alpha`` (``λ >= xmin``) to the eigenvalues, as WeightWatcher's
    ``fit_powerlaw(pl_package='powerlaw')`` does with its defaults (Clauset, Shalizi & Newman
    2009: continuous maximum likelihood, ``xmin`` minimising the KS distance ``D``).

    Calls ``powerlaw.Fit(λ[λ > 1e-5], xmin=None, xmax=None, xmin_distribution='power_law')``.
    ``parameter_ranges={'alpha': [1, None]}`` keeps the valid range of powerlaw 1.x (which
    weightwatcher was written against): powerlaw 2.0 defaults to ``alpha`` in ``[0, 3]``, which
    would cap the exponent of most trained layers (typically 2-6) at 3.

    Returns:
        ``alpha``, ``xmin``, ``xmax`` (largest eigenvalue fitted), ``D`` (KS distance),
        ``sigma`` (standard error of alpha), ``num_pl_spikes`` (eigenvalues ``>= xmin``) and
        ``status`` (``success``, ``too_few_eigenvalues`` or ``failed: ...``); the numbers are
        ``None`` unless ``status == "success"``.
    """
    import powerlaw

    out: dict[str, Any] = {"alpha": None, "xmin": None, "xmax": None, "D": None, "sigma": None,
                           "num_pl_spikes": None, "status": "failed"}
    evals = np.sort(np.asarray(evals, dtype=np.float64))
    data = evals[evals > EVALS_THRESH]
    if evals.size < MIN_EVALS or data.size < 2:
        out["status"] = "too_few_eigenvalues"
        return out
    sink = io.StringIO()  # powerlaw prints its progress; the library never prints
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = powerlaw.Fit(data, xmin=None, xmax=None, verbose=False, xmin_distribution="power_law",
                               parameter_ranges={"alpha": [1, None]})
            alpha, xmin, dist = fit.alpha, fit.xmin, fit.D
            sigma = getattr(fit, "sigma", None)  # powerlaw 2.0 deprecates it (standard_err) for 2.1
    except Exception as exc:  # noqa: BLE001 - a fit that fails is a finding, not a crash
        out["status"] = f"failed: {type(exc).__name__}: {exc}"[:200]
        return out
    if alpha is None or not np.isfinite(alpha):
        return out
    out.update(alpha=float(alpha), xmin=float(xmin), xmax=float(data.max()), D=_finite(dist),
               sigma=_finite(sigma), num_pl_spikes=int((evals >= xmin).sum()), status="success")
    return out


def mp_soft_rank(evals: np.ndarray, n: int, m: int) -> float | None:
    """WeightWatcher's MP soft rank ``λ_bulk+ / λ_max`` (Martin & Mahoney 2021; ``mp_fit`` of
    weightwatcher 0.7, transcribed): the eigenvalues are rescaled to mean 1, the Marchenko-Pastur
    scale ``sigma`` is fitted to a linear-kernel density estimate (bandwidth 0.1, 1000 points) by
    a brute-force search over ``[0.05, 2) · sigma_0`` in steps of ``0.01 · sigma_0`` polished
    by Nelder-Mead (``scipy.optimize.brute``), and ``λ_bulk+ = (sigma (1 + 1/√Q))²`` with
    ``Q = N / M >= 1`` (a square matrix fits the quarter-circle law to the singular values).
    Near 1: all bulk (random-like); near 0: a few large spikes. The density is computed once
    instead of per trial ``sigma`` (weightwatcher refits scikit-learn's KDE each time), which
    gives the same numbers.

    Args:
        evals: all ``M`` eigenvalues ``s²`` (zeros included); n, m: the matrix shape.

    Returns:
        The soft rank, or ``None`` when the fit fails (too few or all-zero eigenvalues).
    """
    from scipy import optimize

    evals = np.asarray(evals, dtype=np.float64)
    N, M = max(n, m), min(n, m)
    if evals.size < 2 or evals.sum() <= 0:
        return None
    Q = N / M
    to_plot = evals * (evals.shape[0] / evals.sum())  # Wscale² = M / ‖W‖_F²
    lambda_max = float(to_plot.max())
    sigma0 = math.sqrt(lambda_max / (1 + 1 / math.sqrt(Q)) ** 2)  # RMT_Util.calc_sigma
    to_fit = np.sqrt(to_plot) if Q == 1 else to_plot
    xde = np.linspace(0, to_fit.max() + 0.5, 1000)
    bw = 0.1
    yde = np.clip(1 - np.abs(xde[:, None] - to_fit[None, :]) / bw, 0, None).sum(axis=1) / (to_fit.size * bw)
    good = yde > 0.01  # RMT_Util.resid_mp's THRESH; the others add zero residuals
    x, y = xde[good], yde[good]
    if not x.size:
        return None
    x_peak = x[np.argmax(y)]

    def cost(p: np.ndarray) -> float:
        sigma = float(np.atleast_1d(p)[0])
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            if Q == 1:
                ymp = np.nan_to_num((1 / (np.pi * sigma * sigma)) * np.sqrt(4 - x**2))
                resid = ymp - y
            else:
                b = (sigma * (1 + np.sqrt(1 / Q))) ** 2
                a = (sigma * (1 - np.sqrt(1 / Q))) ** 2
                if b < x_peak or b > x.max() or a > x_peak:
                    resid = np.zeros(x.size) + 1000
                else:
                    ymp = np.nan_to_num((1 / (2 * np.pi * sigma * sigma * x * (1 / Q))) * np.sqrt((b - x) * (x - a)))
                    resid = ymp - y
            return float(np.sum(resid**2))

    grid = (slice(0.05 * sigma0, 2.0 * sigma0, 0.01 * sigma0),)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            sigma = float(np.atleast_1d(optimize.brute(cost, grid, full_output=True)[0])[0])
    except Exception:  # noqa: BLE001 - a failed fit is reported as missing
        return None
    bulk_max = (sigma * (1 + 1 / np.sqrt(Q))) ** 2
    return _finite(bulk_max / lambda_max)


def spectrum_metrics(s: torch.Tensor | np.ndarray, shape: tuple[int, int], *, heavy_tail: bool = True) -> dict[str, Any]:
    """Every per-matrix metric from the singular values ``s`` of a ``shape`` matrix.

    Returns a dict (JSON types; ``None`` where undefined): ``effective_rank``, ``stable_rank``,
    ``energy_rank_90`` / ``_99`` / ``_999`` (components), ``condition_number`` (``s_max /
    s_min``, ``None`` when ``s_min = 0``), ``spectral_norm`` (``s_max``), ``frobenius_norm``,
    and with ``heavy_tail``: ``alpha``, ``alpha_weighted`` (``alpha · log10 λ_max``),
    ``log_spectral_norm`` (``log10 λ_max``), ``log_norm`` (``log10 Σ λ``), ``log_alpha_norm``
    (``log10 Σ λ^alpha``), ``mp_softrank``, and ``powerlaw`` (the fit's details,
    :func:`fit_powerlaw`); ``λ = s²``.
    """
    s64 = np.asarray(s.detach().cpu() if isinstance(s, torch.Tensor) else s, dtype=np.float64)
    top = float(s64.max()) if s64.size else 0.0
    low = float(s64.min()) if s64.size else 0.0
    out: dict[str, Any] = {
        "effective_rank": effective_rank(s64),
        "stable_rank": stable_rank(s64),
        **{key: energy_rank(s64, fraction) for key, fraction in ENERGY_RANKS.items()},
        "condition_number": top / low if low > 0 else None,
        "spectral_norm": top,
        "frobenius_norm": float(np.sqrt((s64**2).sum())),
    }
    if not heavy_tail:
        return out
    evals = s64**2
    fit = fit_powerlaw(evals)
    alpha = fit["alpha"]
    log_spec = math.log10(top**2) if top > 0 else None
    out.update(
        alpha=alpha,
        alpha_weighted=alpha * log_spec if alpha is not None and log_spec is not None else None,
        log_spectral_norm=log_spec,
        log_norm=math.log10(evals.sum()) if top > 0 else None,
        log_alpha_norm=_finite(math.log10(np.sum(evals**alpha))) if alpha is not None and top > 0 else None,
        mp_softrank=mp_soft_rank(evals, *shape),
        powerlaw=fit,
    )
    return out


class LeftSubspaces:
    """The top-k left singular subspaces of one matrix ``W`` ``(m, n)``, for any ``k``.

    Computed from the Gram matrix of the smaller side, ``g x g`` with ``g = min(m, n)``: the
    eigenvectors of ``W Wᵀ`` are ``U`` when ``m <= n``; when ``m > n`` the eigenvectors ``V`` of
    ``Wᵀ W`` give ``span(U_k) = span(W V_k)`` (orthonormalised by a QR). The Gram product runs
    in float32 and its eigendecomposition in float64: a 50,304 x 768 embedding takes 0.7-1.5 s on one
    CPU core shared with other processes, where a thin ``torch.linalg.svd`` takes 3-7 s (measured). The basis error is of the order
    ``1e-7 · s_1² / (s_k² - s_(k+1)²)`` (Davis-Kahan), that of a float32 SVD. Identical matrices
    give identical bases (the computation is deterministic), hence an angle of exactly 0.
    """

    def __init__(self, weight: torch.Tensor):
        w = weight.detach().to("cpu", torch.float32)
        self.weight = w
        self.tall = w.shape[0] > w.shape[1]
        gram = w.T @ w if self.tall else w @ w.T
        values, vectors = torch.linalg.eigh(gram.double())
        self.values = values.flip(0).clamp_min(0.0)  # s², descending
        self.vectors = vectors.flip(1)

    def top(self, k: int) -> torch.Tensor | None:
        """``U_k`` ``(m, k)`` float64 with orthonormal columns spanning the top-k left singular
        subspace, or ``None`` when it is not defined (``s_k <= 1e-3 s_1``: rank below ``k``
        within float32 precision, e.g. a zero-initialised projection)."""
        k = min(k, self.values.numel())
        if k < 1 or self.values[0] <= 0 or self.values[k - 1] <= 1e-6 * self.values[0]:
            return None
        if not self.tall:
            return self.vectors[:, :k]
        spanned = self.weight @ self.vectors[:, :k].float()
        return torch.linalg.qr(spanned.double())[0]


def largest_principal_angle(u_a: torch.Tensor, u_b: torch.Tensor) -> float:
    """The largest principal angle (radians, ``[0, π/2]``) between ``span(u_a)`` and ``span(u_b)``,
    both ``(m, k)`` with orthonormal columns (Björck & Golub 1973).

    SEEDS_SPEC 2.2 writes it ``arccos(min svdvals(u_aᵀ u_b))``; ``arccos`` loses half the digits
    near 0 (an identical subspace would read ~5e-4 rad in float32), so this takes
    ``atan2(sin, cos)`` with ``sin = ‖(I - u_a u_aᵀ) u_b‖_2`` and ``cos = min svdvals(u_aᵀ u_b)``
    in float64 (Knyazev & Argentati 2002), the same angle, accurate at both ends.
    """
    a, b = u_a.double(), u_b.double()
    cross = a.T @ b
    cos = float(torch.linalg.svdvals(cross).min().clamp(0.0, 1.0))
    sin = float(torch.linalg.matrix_norm(b - a @ cross, ord=2).clamp(0.0, 1.0))
    return math.atan2(sin, cos)


def delta_in_subspace(u_prev: torch.Tensor, delta: torch.Tensor) -> float | None:
    """``‖P ΔW‖_F / ‖ΔW‖_F`` with ``P = u_prev u_prevᵀ`` the projector on the previous top-k left
    subspace (``u_prev`` ``(m, k)``, ``delta`` ``(m, n)``): how much of the change lies in the old
    principal output directions (a norm ratio in ``[0, 1]``, not squared). ``None`` when
    ``ΔW = 0``."""
    d = delta.to(torch.float32)  # float32 products: ~1e-6 relative, and no float64 copy of a big ΔW
    total = float(torch.linalg.matrix_norm(d))
    if total == 0:
        return None
    return min(1.0, float(torch.linalg.matrix_norm(u_prev.to(torch.float32).T @ d)) / total)


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
