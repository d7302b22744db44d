"""Small-sample statistics for the evaluation tasks: a stratified paired bootstrap of a
weighted sum of per-group mean differences (its interval), a paired sign-flip randomization
test of the same statistic (its p-value), and Holm's step-down correction.

The head-ablation task (SEEDS_SPEC 3.5) scores the same items with and without a head:
per item ``d_i = base_i - ablated_i`` (1, 0 or -1 for correct/incorrect flags). Its impact
``(base_paren - abl_paren) - (base_flat - abl_flat)`` is ``mean(d_paren) - mean(d_flat)``,
i.e. :func:`paired_bootstrap` with groups ``(paren, flat)`` and weights ``(+1, -1)``.

Why the p-value is not read off the bootstrap: with 0/1 scores most ``d_i`` are 0 and the
bootstrap of a handful of discordant items is too liberal (7 of 7 discordant items lost:
bootstrap tail ~ e^-7, 0.002; the exact McNemar/sign test, 2 * 2^-7 = 0.016).
:func:`sign_flip_test` is exact for "ablating changes nothing" and conservative for
"impact 0 with equal effects on both splits".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Resamples drawn by default, and the fixed seed (results are reproducible run to run).
N_BOOT = 10_000
SEED = 0


@dataclass
class BootstrapResult:
    """Per statistic (leading axis ``k``): the estimate, the percentile interval and a p-value.

    Attributes:
        estimate: ``(k,)`` the statistic on the items as they are.
        low, high: ``(k,)`` the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the
            bootstrap distribution (percentile interval; Efron & Tibshirani 1993, ch. 13).
        p_value: ``(k,)`` two-sided, the bootstrap test dual to the percentile interval:
            ``min(1, 2 * min(P*(stat <= 0), P*(stat >= 0)))`` with the ``(count + 1) / (B + 1)``
            correction (never 0; all-zero resamples give 1). Liberal for sparse 0/1 differences:
            prefer :func:`sign_flip_test` for significance.
        n_boot: resamples drawn; level: the interval's coverage; seed: the generator's seed.
    """

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    p_value: np.ndarray
    n_boot: int
    level: float
    seed: int


def paired_bootstrap(diffs: Sequence[np.ndarray], weights: Sequence[float], *, n_boot: int = N_BOOT,
                     seed: int = SEED, level: float = 0.95) -> BootstrapResult:
    """Bootstrap of ``stat = sum_g weights[g] * mean_i diffs[g][:, i]``, resampling the items of
    each group independently (stratified) and with the same resample for every row (paired:
    a resampled item keeps its base and ablated scores together; the rows, e.g. the heads,
    share the draw).

    Args:
        diffs: one array per group, ``(k, n_g)`` (or ``(n_g,)`` for ``k = 1``): per-item paired
            differences (e.g. ``base - ablated`` correctness) of ``k`` statistics.
        weights: one weight per group.
        n_boot: resamples; seed: ``numpy.random.default_rng`` seed; level: interval coverage.

    Returns:
        A :class:`BootstrapResult` with ``(k,)`` arrays.

    Raises:
        ValueError: mismatched groups/weights or rows, an empty group, ``n_boot < 1`` or a
            level outside (0, 1).
    """
    if len(diffs) != len(weights) or not diffs:
        raise ValueError("paired_bootstrap: give one weight per group (at least one group)")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"paired_bootstrap: n_boot must be >= 1 and level in (0, 1), got {n_boot}, {level}")
    arrays = [np.atleast_2d(np.asarray(d, dtype=np.float64)) for d in diffs]
    k = arrays[0].shape[0]
    if any(a.shape[0] != k for a in arrays) or any(a.shape[1] == 0 for a in arrays):
        raise ValueError("paired_bootstrap: every group needs the same number of rows and at least one item")
    rng = np.random.default_rng(seed)
    estimate = np.zeros(k)
    boot = np.zeros((n_boot, k))
    for w, a in zip(weights, arrays, strict=True):
        n = a.shape[1]
        estimate += w * a.mean(axis=1)
        # counts[b, i]: how often item i is drawn in resample b (a multinomial draw of n items)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
        boot += w * (counts @ a.T) / n
    alpha = 1.0 - level
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=0)
    below = ((boot <= 0).sum(axis=0) + 1) / (n_boot + 1)
    above = ((boot >= 0).sum(axis=0) + 1) / (n_boot + 1)
    p = np.minimum(1.0, 2 * np.minimum(below, above))
    return BootstrapResult(estimate, low, high, p, n_boot, level, seed)


def sign_flip_test(diffs: Sequence[np.ndarray], weights: Sequence[float], *, n_perm: int = N_BOOT,
                   seed: int = SEED) -> np.ndarray:
    """Two-sided paired randomization test of ``stat = sum_g weights[g] * mean_i diffs[g][:, i]``
    against 0: each item's difference keeps or flips its sign at random (swapping its base and
    ablated scores), the same flips for every row; ``p = (#{|stat*| >= |stat|} + 1) / (n_perm + 1)``
    (Fisher 1935; the Monte Carlo form of McNemar's exact test for one group of 0/1 scores).

    Args:
        diffs, weights: as :func:`paired_bootstrap`. n_perm: random sign patterns; seed: fixed.

    Returns:
        ``(k,)`` p-values in ``(0, 1]`` (1 for a row of zeros).

    Raises:
        ValueError: as :func:`paired_bootstrap`.
    """
    if len(diffs) != len(weights) or not diffs or n_perm < 1:
        raise ValueError("sign_flip_test: give one weight per group (at least one group) and n_perm >= 1")
    arrays = [np.atleast_2d(np.asarray(d, dtype=np.float64)) for d in diffs]
    k = arrays[0].shape[0]
    if any(a.shape[0] != k for a in arrays) or any(a.shape[1] == 0 for a in arrays):
        raise ValueError("sign_flip_test: every group needs the same number of rows and at least one item")
    rng = np.random.default_rng(seed)
    observed = sum(w * a.mean(axis=1) for w, a in zip(weights, arrays, strict=True))
    null = np.zeros((n_perm, k))
    for w, a in zip(weights, arrays, strict=True):
        signs = rng.choice(np.array([-1.0, 1.0]), size=(n_perm, a.shape[1]))
        null += w * (signs @ a.T) / a.shape[1]
    extreme = (np.abs(null) >= np.abs(observed) - 1e-12).sum(axis=0)
    return (extreme + 1) / (n_perm + 1)


def holm(p_values: Sequence[float], alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down correction for ``m`` tests (Holm 1979): sort the p-values
    ``p_(1) <= ... <= p_(m)``; the adjusted value is ``max_{j <= i} min(1, (m - j + 1) p_(j))``;
    reject where it is ``<= alpha``. Controls the family-wise error rate at ``alpha`` under any
    dependence between the tests.

    Returns:
        ``(adjusted (m,), reject (m,) bool)`` in the input order.

    Raises:
        ValueError: a p-value outside [0, 1] or NaN.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.size and (np.isnan(p).any() or (p < 0).any() or (p > 1).any()):
        raise ValueError("holm: p-values must lie in [0, 1]")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, p[order] * (m - np.arange(m)))
    adjusted_sorted = np.maximum.accumulate(scaled) if m else scaled
    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    return adjusted, adjusted <= alpha
