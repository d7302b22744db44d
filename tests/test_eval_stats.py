"""lmkit.evaluation.stats: Holm's correction against a hand-worked example, and the paired
bootstrap's coverage, width (pairing) and p-values on simulated head ablations."""

import numpy as np
import pytest

from lmkit.evaluation.stats import holm, paired_bootstrap, sign_flip_test


def test_holm_hand_worked():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running max 0.06)
    adjusted, reject = holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    assert reject.tolist() == [True, False, False, True]


def test_holm_caps_at_one_and_keeps_ties():
    adjusted, reject = holm([0.5, 0.5, 0.001], alpha=0.05)
    np.testing.assert_allclose(adjusted, [1.0, 1.0, 0.003])
    assert reject.tolist() == [False, False, True]
    assert holm([])[0].size == 0
    with pytest.raises(ValueError):
        holm([0.2, 1.5])


def _simulate(rng, n, p_paren, p_flat):
    """Paired (base, ablated) correctness with joint probabilities for (1,0), (0,1), (1,1), (0,0)."""
    def draw(p):
        k = rng.choice(4, size=n, p=p)
        base = np.isin(k, (0, 2)).astype(float)
        abl = np.isin(k, (1, 2)).astype(float)
        return base - abl
    return draw(p_paren), draw(p_flat)


# paren: E[base - abl] = 0.15 - 0.05 = 0.10; flat: 0.05 - 0.05 = 0. Strongly correlated pairs.
P_PAREN, P_FLAT, TRUTH = [0.15, 0.05, 0.40, 0.40], [0.05, 0.05, 0.45, 0.45], 0.10


def _se(p, n):
    p = np.asarray(p)
    values = np.array([1.0, -1.0, 0.0, 0.0])
    var = (p * values**2).sum() - (p * values).sum() ** 2
    return np.sqrt(var / n)


def test_bootstrap_interval_covers_the_truth_and_is_paired():
    rng = np.random.default_rng(123)
    n, covered, widths = 100, 0, []
    for sim in range(100):
        d_paren, d_flat = _simulate(rng, n, P_PAREN, P_FLAT)
        res = paired_bootstrap([d_paren, d_flat], [1.0, -1.0], n_boot=2000, seed=sim)
        assert res.estimate[0] == pytest.approx(d_paren.mean() - d_flat.mean())
        covered += bool(res.low[0] <= TRUTH <= res.high[0])
        widths.append(res.high[0] - res.low[0])
    assert covered >= 90
    # the width of a 95% interval of a paired difference: 2 * 1.96 * SE(mean d_paren - mean d_flat);
    # resampling base and ablated scores independently would make it ~2.5x wider here
    expected = 2 * 1.96 * np.hypot(_se(P_PAREN, n), _se(P_FLAT, n))
    assert np.mean(widths) == pytest.approx(expected, rel=0.15)


def test_bootstrap_rows_share_the_resample_and_p_values():
    rng = np.random.default_rng(7)
    n = 100
    strong = np.r_[np.ones(30), np.zeros(70)]  # the head costs 30 paren items, no flat ones
    none = np.zeros(n)
    d_paren = np.stack([strong, none, rng.permutation(strong)])
    d_flat = np.stack([none, none, none])
    res = paired_bootstrap([d_paren, d_flat], [1.0, -1.0], n_boot=4000, seed=0)
    np.testing.assert_allclose(res.estimate, [0.3, 0.0, 0.3])
    assert res.p_value[0] < 0.001 and res.p_value[2] < 0.001
    assert res.p_value[1] == 1.0 and res.low[1] == res.high[1] == 0.0
    assert res.low[0] > 0.15 and res.high[0] < 0.45
    # fixed seed: the same numbers again
    again = paired_bootstrap([d_paren, d_flat], [1.0, -1.0], n_boot=4000, seed=0)
    np.testing.assert_array_equal(res.low, again.low)


def test_bootstrap_p_value_of_a_null_effect_is_not_small():
    rng = np.random.default_rng(11)
    small = 0
    for sim in range(40):
        d_paren, d_flat = _simulate(rng, 100, P_FLAT, P_FLAT)  # no true impact
        res = paired_bootstrap([d_paren, d_flat], [1.0, -1.0], n_boot=1000, seed=sim)
        small += bool(res.p_value[0] < 0.05)
    assert small <= 6  # ~5% expected


def test_bootstrap_bad_input():
    with pytest.raises(ValueError):
        paired_bootstrap([np.zeros(3)], [1.0, -1.0])
    with pytest.raises(ValueError):
        paired_bootstrap([np.zeros((2, 3)), np.zeros((3, 3))], [1.0, -1.0])
    with pytest.raises(ValueError):
        paired_bootstrap([np.zeros(3)], [1.0], level=1.5)


@pytest.mark.parametrize("lost, gained", [(7, 0), (9, 2), (3, 3)])
def test_sign_flip_test_is_the_exact_sign_test_for_one_split(lost, gained):
    from scipy.stats import binomtest

    d = np.r_[np.ones(lost), -np.ones(gained), np.zeros(100 - lost - gained)]
    p = sign_flip_test([d, np.zeros(100)], [1.0, -1.0], n_perm=20_000, seed=1)[0]
    want = binomtest(lost, lost + gained, 0.5).pvalue  # McNemar's exact test on the discordant items
    assert p == pytest.approx(want, abs=0.004)
    if lost == 7:  # the bootstrap's own tail is far smaller here: too liberal for sparse 0/1 differences
        assert paired_bootstrap([d, np.zeros(100)], [1.0, -1.0]).p_value[0] < want / 4


def test_sign_flip_test_null_rate_zeros_and_rows():
    rng = np.random.default_rng(5)
    small = 0
    for sim in range(60):
        d_paren, d_flat = _simulate(rng, 100, P_FLAT, P_FLAT)
        small += bool(sign_flip_test([d_paren, d_flat], [1.0, -1.0], n_perm=1000, seed=sim)[0] < 0.05)
    assert small <= 7  # ~5% of 60 expected
    rows = np.stack([np.zeros(50), np.r_[np.ones(20), np.zeros(30)]])
    p = sign_flip_test([rows, np.zeros((2, 50))], [1.0, -1.0], n_perm=2000)
    assert p[0] == 1.0 and p[1] < 0.001
