"""The adaptive-SVD policy (SEEDS_SPEC 2.2-2.4) on constructed matrices with known answers:
alignments, principal angles (against scipy), reconstruction error (against an explicit
truncation), energy ranks (a loop), the r update, every decision reason, and analyse()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lmkit.errors import ConfigError
from lmkit.models.svd_linear import AdaptiveSVDLinear, svd
from lmkit.models.svd_policy import (
    THRESHOLD_KEYS,
    Analysis,
    analyse,
    decide,
    default_r,
    energy_rank,
    layer_metrics,
    next_r,
)

ORIGINAL = dict(zip(THRESHOLD_KEYS, (0.4, 0.6, 0.1, 0.01), strict=True))  # SEEDS_SPEC 2.4, Nov 7
ADJUSTED = dict(zip(THRESHOLD_KEYS, (0.3, 0.5, 0.15, 0.01), strict=True))  # commit 2ddc81a


def _orth(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def _rand(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.matrix_norm(x)


def _givens(U: torch.Tensor, i: int, j: int, theta: float) -> torch.Tensor:
    """U with columns i, j rotated by theta in their plane (still orthonormal)."""
    U = U.clone()
    ci, cj = U[:, i].clone(), U[:, j].clone()
    U[:, i] = math.cos(theta) * ci + math.sin(theta) * cj
    U[:, j] = -math.sin(theta) * ci + math.cos(theta) * cj
    return U


G_ = 32  # g of the square test layers
K_ = 20  # principal components with r = 12
SAFE_S = torch.cat([torch.linspace(3.0, 1.0, K_), 1e-3 * torch.linspace(1.0, 0.5, G_ - K_)]).double()
FLAT_S = torch.linspace(2.0, 1.0, G_).double()


def _weight(U, S, V):
    return ((U[:, : S.numel()] * S) @ V[:, : S.numel()].T).float()


def _metrics(W, G, r=G_ - K_, W_prev=None):
    U, S, Vh = svd(W)
    snap = svd(W_prev) if W_prev is not None else None
    return layer_metrics(U, S, Vh, None if G is None else G.float(), r, snap)


# --- metrics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("phi", [0.0, 0.3, 1.2, math.pi / 2])
def test_alignments_of_a_gradient_with_known_split(phi):
    Q, V = _orth(G_, 1), _orth(G_, 2)
    W = _weight(Q, SAFE_S, V)
    Gp = _unit(Q[:, :K_] @ _rand((K_, G_), 3))  # in the principal output subspace
    Gm = _unit(Q[:, K_:] @ _rand((G_ - K_, G_), 4))  # in the minor one
    m = _metrics(W, math.cos(phi) * Gp + math.sin(phi) * Gm)
    assert m["principal_alignment"] == pytest.approx(math.cos(phi), abs=1e-5)
    assert m["minor_alignment"] == pytest.approx(math.sin(phi), abs=1e-5)
    assert m["grad_norm"] == pytest.approx(1.0, abs=1e-5)
    assert "subspace_angle" not in m


def test_alignments_of_a_tall_layer_leave_out_what_is_outside_the_range():
    Q, V = _orth(48, 5), _orth(G_, 6)
    W = _weight(Q, SAFE_S, V)  # 48 x 32: U spans 32 of 48 output directions
    parts = [_unit(Q[:, a:b] @ _rand((b - a, G_), s)) for a, b, s in ((0, K_, 7), (K_, G_, 8), (G_, 48, 9))]
    coef = (0.2, 0.55, math.sqrt(1 - 0.2**2 - 0.55**2))
    m = _metrics(W, sum(c * p for c, p in zip(coef, parts, strict=True)))
    assert (m["principal_alignment"], m["minor_alignment"]) == (pytest.approx(0.2, abs=1e-5),
                                                                pytest.approx(0.55, abs=1e-5))


@pytest.mark.parametrize("shape", [(32, 32), (24, 40)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_principal_and_minor_alignment_squares_sum_to_one_when_u_is_complete(shape, seed):
    W, G = _rand(shape, seed).float(), _rand(shape, seed + 10).float()
    m = _metrics(W, G, r=7)
    assert m["principal_alignment"] ** 2 + m["minor_alignment"] ** 2 == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("r", [1, 7, 22, 31])
def test_reconstruction_error_against_an_explicit_truncation(r):
    W = (_rand((32, 40), 11) @ torch.diag(torch.logspace(0, -3, 40, dtype=torch.float64)) @ _rand((40, 40), 12))
    W = W.float()
    k = 32 - r
    u, s, vt = np.linalg.svd(W.double().numpy(), full_matrices=False)
    Wk = (u[:, :k] * s[:k]) @ vt[:k]
    ref = np.linalg.norm(W.double().numpy() - Wk) / np.linalg.norm(W.double().numpy())
    assert _metrics(W, None, r=r)["reconstruction_error"] == pytest.approx(ref, rel=1e-4, abs=1e-7)


def test_energy_ranks_against_a_loop():
    S = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.01, 0.001])
    for p, key in ((0.9, "energy_rank_90"), (0.99, "energy_rank_99"), (0.999, "energy_rank_999")):
        e = [float(x) ** 2 for x in S]
        n, acc = 0, 0.0
        while acc < p * sum(e):  # the smallest n whose cumulative energy reaches p
            acc += e[n]
            n += 1
        assert energy_rank(S, p) == n
        U = torch.eye(10)
        assert layer_metrics(U, S, U, None, 3)[key] == n
    assert [energy_rank(S, p) for p in (0.9, 0.99, 0.999)] == [3, 4, 6]  # by hand: total 39.33; cumulative 25, 34, 38, 39, 39.25, 39.31


def test_unset_r_means_the_top_ten_are_principal():
    assert (default_r(256), default_r(32), default_r(8)) == (246, 22, 1)
    W = _rand((32, 32), 13).float()
    assert _metrics(W, None, r=None) == _metrics(W, None, r=22)
    with pytest.raises(ValueError, match=r"r must be in \[1, 31\]"):
        _metrics(W, None, r=32)


@pytest.mark.parametrize("theta", [0.5, 1e-3, 1.4])
def test_subspace_angle_of_a_known_rotation_and_against_scipy(theta):
    subspace_angles = pytest.importorskip("scipy.linalg").subspace_angles
    Q, V = _orth(G_, 14), _orth(G_, 15)
    Q_rot = _givens(_givens(Q, 3, K_ + 3, theta), 5, K_ + 1, theta / 2)  # two rotations: the largest counts
    W_prev, W = _weight(Q, SAFE_S, V), _weight(Q_rot, SAFE_S, V)
    m = _metrics(W, None, W_prev=W_prev)
    assert m["subspace_angle"] == pytest.approx(theta, abs=2e-5)  # arccos alone resolves ~3e-4 in float32
    U_prev, U = svd(W_prev)[0], svd(W)[0]
    ref = float(np.max(subspace_angles(U_prev[:, :K_].double().numpy(), U[:, :K_].double().numpy())))
    assert m["subspace_angle"] == pytest.approx(ref, abs=2e-5)
    assert _metrics(W, None, W_prev=W)["subspace_angle"] == pytest.approx(0.0, abs=1e-5)


# --- r update -----------------------------------------------------------------------------------


def test_next_r_with_a_previous_spectrum():
    S = torch.linspace(3.0, 0.1, 32)
    moved = S.clone()
    moved[-8:] *= 1.5  # b = min(r, g // 4) = 8 bottom values change by 50%: rel 0.5 > 0.1
    assert next_r(S, S.clone(), 20, 8) == 16  # stable: int(0.8 * 20)
    assert next_r(moved, S, 20, 8) == 24  # changing: max(20, int(1.2 * 20))
    assert next_r(moved, S, 30, 8) == 31  # int(36) clamped to g - 1
    assert next_r(S, S.clone(), 9, 8) == 8  # int(7.2) clamped to r_min
    slight = S.clone()
    slight[-8:] *= 1.05  # rel 0.05 <= 0.1: stable
    assert next_r(slight, S, 20, 8) == 16
    slight[-8:] = S[-8:] * 1.15  # rel 0.15 > 0.1: changing
    assert next_r(slight, S, 20, 8) == 24
    assert next_r(S, S.clone(), None, 8) == int(0.8 * 22)
    assert next_r(torch.linspace(2, 1, 8), torch.linspace(2, 1, 8), 5, 8) == 7  # r_min > g - 1: g - 1


def test_next_r_heuristics_without_a_previous_spectrum():
    # energy wins: 20 large values then 12 tiny ones; gap at i = 19 -> 13; energy rank 20 -> 12; g // 2 = 16
    S = torch.cat([10 - 0.1 * torch.arange(20.0), torch.full((12,), 1e-3)])
    assert next_r(S, None, 22, 8) == 12
    # the gap wins: [10]*10, [0.1]*10, [1e-4]*12: largest ratio at i = 19 -> 13; energy rank 10 -> 22
    S = torch.cat([torch.full((10,), 10.0), torch.full((10,), 0.1), torch.full((12,), 1e-4)])
    assert next_r(S, None, 22, 8) == 13
    assert next_r(S, torch.ones(16), 22, 8) == 13  # a spectrum of another length counts as none
    assert next_r(S, None, 22, 20) == 20  # r_min


# --- the decision rule ----------------------------------------------------------------------------


def _grad(Q, split, seed=20):
    """A unit gradient with principal / minor parts of the given norms (square layer, k = 20)."""
    p, m = split
    return p * _unit(Q[:, :K_] @ _rand((K_, G_), seed)) + m * _unit(Q[:, K_:] @ _rand((G_ - K_, G_), seed + 1))


def test_every_reason_of_the_decision_rule():
    Q, V = _orth(G_, 21), _orth(G_, 22)
    safe, flat = _weight(Q, SAFE_S, V), _weight(Q, FLAT_S, V)
    rotated = _weight(_givens(Q, 2, K_ + 2, 0.5), SAFE_S, V)
    principal, minor, mostly_minor = _grad(Q, (1, 0)), _grad(Q, (0, 1)), _grad(Q, (0.2, math.sqrt(0.96)))

    m = _metrics(safe, principal, W_prev=safe)
    assert decide(m, 40, ADJUSTED, 10) == ("lowrank", "gradient_clobbering_risk")
    assert decide(m, 5, ADJUSTED, 10) == ("full", "warmup_period")
    m = _metrics(safe, minor, W_prev=safe)
    assert m["reconstruction_error"] < 0.01 and m["subspace_angle"] < 1e-4
    assert decide(m, 40, ADJUSTED, 10) == ("lowrank", "optimal_lowrank_conditions")
    m = _metrics(flat, minor, W_prev=flat)
    assert m["reconstruction_error"] > 0.4
    assert decide(m, 40, ADJUSTED, 10) == ("full", "reconstruction_unsafe")
    m = _metrics(flat, principal, W_prev=flat)  # clobbering comes before the reconstruction check
    assert decide(m, 40, ADJUSTED, 10) == ("lowrank", "gradient_clobbering_risk")
    m = _metrics(safe, mostly_minor, W_prev=rotated)  # safe and minor, but the subspace moved 0.5 rad
    assert m["subspace_angle"] == pytest.approx(0.5, abs=1e-4)
    assert decide(m, 40, ADJUSTED, 10) == (None, "continue_current_mode")
    m = _metrics(safe, minor)  # no snapshot: no angle, so never "optimal"
    assert decide(m, 40, ADJUSTED, 10) == (None, "continue_current_mode")


def test_the_threshold_sets_decide_differently():
    Q, V = _orth(G_, 23), _orth(G_, 24)
    safe = _weight(Q, SAFE_S, V)
    m = _metrics(safe, _grad(Q, (0.35, math.sqrt(1 - 0.35**2))), W_prev=safe)
    assert decide(m, 40, ADJUSTED, 10) == ("lowrank", "gradient_clobbering_risk")  # 0.35 > 0.3
    assert decide(m, 40, ORIGINAL, 10) == ("lowrank", "optimal_lowrank_conditions")  # 0.35 <= 0.4
    assert decide(m, 40, None, 10) == decide(m, 40, ADJUSTED, 10)  # adjusted is the default
    rotated = _weight(_givens(Q, 1, K_ + 1, 0.12), SAFE_S, V)
    m = _metrics(safe, _grad(Q, (0.1, math.sqrt(0.99))), W_prev=rotated)  # angle 0.12: stable for 0.15 only
    assert decide(m, 40, ADJUSTED, 10)[1] == "optimal_lowrank_conditions"
    assert decide(m, 40, ORIGINAL, 10)[1] == "continue_current_mode"
    with pytest.raises(ConfigError, match="missing recon_safe"):
        decide(m, 40, {k: ADJUSTED[k] for k in THRESHOLD_KEYS[:3]}, 10)


# --- analyse() --------------------------------------------------------------------------------------


def _layer(W: torch.Tensor) -> AdaptiveSVDLinear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    return AdaptiveSVDLinear(lin)


def _backprop(layer: AdaptiveSVDLinear, G: torch.Tensor) -> None:
    """A backward whose gradient for the effective weight is G: y = I W^T, L = sum(y * G^T)."""
    y = layer(torch.eye(layer.in_features))
    (y * G.float().T).sum().backward()


def test_analyse_follows_a_layer_through_full_lowrank_and_back():
    Q, V = _orth(G_, 25), _orth(G_, 26)
    layer = _layer(_weight(Q, SAFE_S, V))
    principal = _unit(Q[:, :10] @ _rand((10, G_), 30))  # r unset: only the top 10 are principal
    layer.weight.grad = principal.float()
    a = analyse(layer, 20, ADJUSTED, 10, 8)
    assert isinstance(a, Analysis) and (a.mode, a.r, a.want, a.reason) == ("full", None, None, "initial_svd_computation")
    assert "subspace_angle" not in a.metrics and a.metrics["principal_alignment"] > 0.99 and a.svd is not None
    layer.update_snapshot(svd=a.svd)
    a = analyse(layer, 40, ADJUSTED, 10, 8)
    assert (a.want, a.reason, a.r_next) == ("lowrank", "gradient_clobbering_risk", 17)  # int(0.8 * (32 - 10))
    assert a.metrics["subspace_angle"] < 1e-4
    assert a.to_dict()["metrics"] == a.metrics and "svd" not in a.to_dict()
    layer.switch_to_lowrank(a.r_next, svd=a.svd)
    layer.update_snapshot()
    # low-rank: no captured gradient yet; then a captured one (the seed's layer was stuck here)
    assert analyse(layer, 60, ADJUSTED, 10, 8).reason == "no_gradient_yet"
    layer.capture_grad = True
    minor = Q[:, 20:] @ _rand((12, G_), 27)  # outside the top k = 15, inside the minor 17
    _backprop(layer, minor)
    assert torch.allclose(layer.effective_grad(), minor.float(), atol=1e-6)
    a = analyse(layer, 60, ADJUSTED, 10, 8)
    assert (a.mode, a.r) == ("lowrank", 17)
    assert a.metrics["minor_alignment"] == pytest.approx(1.0, abs=1e-5)
    assert a.metrics["reconstruction_error"] > 0.1  # k = 15 drops five large values
    assert (a.want, a.reason) == ("full", "reconstruction_unsafe")
    layer.switch_to_full()
    assert layer.mode == "full" and layer.weight.requires_grad


def test_analyse_reports_missing_and_invalid_inputs():
    Q, V = _orth(G_, 28), _orth(G_, 29)
    layer = _layer(_weight(Q, SAFE_S, V))
    a = analyse(layer, 20)
    assert a.reason == "initial_svd_computation" and "principal_alignment" not in a.metrics  # no gradient: no alignment
    layer.update_snapshot()
    assert (analyse(layer, 40).reason, analyse(layer, 40).want) == ("no_gradient_yet", None)
    grad = torch.zeros(G_, G_)
    grad[0, 0] = float("nan")
    layer.weight.grad = grad
    a = analyse(layer, 40)
    assert (a.reason, a.want, a.metrics) == ("invalid_gradient", None, {})
    with torch.no_grad():
        layer.weight[1, 1] = float("inf")
    assert analyse(layer, 40).reason == "invalid_weight"
    layer.weight.grad = torch.ones(G_, G_)
    with torch.no_grad():
        layer.weight[1, 1] = 0.0
    assert analyse(layer, 5, ADJUSTED, 10, 8).reason == "warmup_period"
