"""AdaptiveSVDLinear (SEEDS_SPEC 2.1): modes, MiLoRA exactness, the effective gradient in both
modes, re-factoring, SVD routing, checkpoint round trips through the load adapter, folding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lmkit.models.svd_linear as sl
from lmkit.config import GPTConfig
from lmkit.errors import TrainingError
from lmkit.models import build_model
from lmkit.models.base import LOAD_ADAPTERS
from lmkit.models.svd_linear import AdaptiveSVDLinear, fold_svd_layers, svd, svd_device_for

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)


def _linear(out=40, inp=48, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.1)
    return lin


def _gpt(seed=0):
    torch.manual_seed(seed)
    return build_model(GPTConfig(**TINY))


def _tokens(seed=1, batch=2, T=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (batch, T), generator=g)


def test_full_mode_is_the_linear_with_the_same_parameters():
    lin = _linear()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    layer = AdaptiveSVDLinear(lin)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert (layer.in_features, layer.out_features, layer.mode, layer.r) == (48, 40, "full", None)
    assert opt.param_groups[0]["params"][0] is layer.weight
    x = torch.randn(3, 5, 48)
    assert torch.equal(layer(x), lin(x))
    assert layer.matmul_params() == 40 * 48
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "svd_mode", "svd_r"}
    assert sd["svd_mode"].dtype == torch.int64 and int(sd["svd_r"]) == -1


@pytest.mark.parametrize("shape", [(40, 48), (48, 40), (32, 32)])
def test_switch_to_lowrank_is_milora_and_keeps_the_output(shape):
    out, inp = shape
    lin = _linear(out, inp)
    W = lin.weight.detach().clone()
    x = torch.randn(4, inp)
    y = lin(x).detach()
    layer = AdaptiveSVDLinear(lin)
    layer.weight.grad = torch.ones_like(W)
    g, r = min(shape), 5
    k = g - r
    layer.switch_to_lowrank(r)
    assert (layer.mode, layer.r, int(layer.svd_mode), int(layer.svd_r)) == ("lowrank", 5, 1, 5)
    assert layer.lora_B.shape == (out, r) and layer.lora_A.shape == (r, inp)
    assert (layer.weight_principal + layer.lora_B @ layer.lora_A - W).abs().max() < 1e-5
    assert (layer(x) - y).abs().max() < 1e-5
    # independent checks of the factors against a float64 SVD of W
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    Wp_ref = (U[:, :k] * S[:k]) @ Vh[:k]
    assert (layer.weight_principal.double() - Wp_ref).abs().max() < 1e-5
    assert torch.linalg.svdvals(layer.weight_principal.double())[k] < 1e-5 * S[0]  # rank k
    # MiLoRA: B^T B = A A^T = diag(S[k:]) and B A = the minor part of W
    assert torch.allclose((layer.lora_B.T @ layer.lora_B).double(), torch.diag(S[k:]), atol=1e-5)
    assert torch.allclose((layer.lora_A @ layer.lora_A.T).double(), torch.diag(S[k:]), atol=1e-5)
    assert torch.allclose((layer.lora_B @ layer.lora_A).double(), (U[:, k:] * S[k:]) @ Vh[k:], atol=1e-5)
    # trainability
    assert not layer.weight.requires_grad and layer.weight.grad is None
    assert layer.lora_B.requires_grad and layer.lora_A.requires_grad and layer.bias.requires_grad
    assert layer.weight_principal.requires_grad is False
    assert set(layer.state_dict()) == {"weight", "bias", "lora_B", "lora_A", "weight_principal", "svd_mode", "svd_r"}


def test_switch_to_full_folds_back_into_the_same_parameter():
    layer = AdaptiveSVDLinear(_linear())
    weight = layer.weight
    layer.switch_to_lowrank(7)
    with torch.no_grad():  # train the factors a little
        layer.lora_B.add_(0.01 * torch.randn_like(layer.lora_B))
        layer.lora_A.add_(0.01 * torch.randn_like(layer.lora_A))
    x = torch.randn(4, 48)
    y = layer(x).detach()
    expected = (layer.weight_principal + layer.lora_B @ layer.lora_A).detach().clone()
    layer.lora_B.grad = torch.ones_like(layer.lora_B)
    layer.switch_to_full()
    assert layer.weight is weight and torch.equal(layer.weight.detach(), expected)
    assert (layer.mode, layer.r, int(layer.svd_mode)) == ("full", 7, 0)
    assert layer.weight.requires_grad and not layer.lora_B.requires_grad and not layer.lora_A.requires_grad
    assert layer.lora_B.grad is None and layer.lora_A.grad is None
    assert torch.equal(layer(x), torch.nn.functional.linear(x, expected, layer.bias))
    assert (layer(x) - y).abs().max() < 1e-6
    with pytest.raises(ValueError, match="already in full mode"):
        layer.switch_to_full()


def test_refactor_changes_r_and_keeps_the_output():
    layer = AdaptiveSVDLinear(_linear())
    layer.switch_to_lowrank(5)
    with torch.no_grad():
        layer.lora_B.add_(0.05 * torch.randn_like(layer.lora_B))
    x = torch.randn(6, 48)
    y = layer(x).detach()
    W_eff = layer.effective_weight()
    layer.refactor(12)
    assert layer.r == 12 and layer.lora_B.shape == (40, 12) and layer.lora_A.shape == (12, 48)
    assert (layer(x) - y).abs().max() < 1e-5
    assert (layer.effective_weight() - W_eff).abs().max() < 1e-5
    S = torch.linalg.svdvals(W_eff.double())
    assert torch.linalg.svdvals(layer.weight_principal.double())[40 - 12] < 1e-5 * S[0]  # rank g - 12
    assert torch.allclose((layer.lora_B.T @ layer.lora_B).double(), torch.diag(S[-12:]), atol=1e-5)
    with pytest.raises(ValueError, match="already low-rank"):
        layer.switch_to_lowrank(3)
    layer.switch_to_full()
    with pytest.raises(ValueError, match="needs low-rank mode"):
        layer.refactor(4)


@pytest.mark.parametrize("r", [0, 40, 41, 2.5, True])
def test_bad_r_is_refused(r):
    layer = AdaptiveSVDLinear(_linear())
    with pytest.raises(ValueError, match=r"r must be an int in \[1, 39\]"):
        layer.switch_to_lowrank(r)
    assert layer.mode == "full" and layer.lora_B is None


def test_effective_grad_in_lowrank_mode_is_the_full_weight_gradient():
    """The reference: a plain linear holding the effective weight; the same two micro-batches."""
    layer = AdaptiveSVDLinear(_linear())
    layer.switch_to_lowrank(6)
    ref = nn.Linear(48, 40)
    with torch.no_grad():
        ref.weight.copy_(layer.effective_weight())
        ref.bias.copy_(layer.bias)
    xs = [torch.randn(5, 48) for _ in range(2)]
    assert layer.effective_grad() is None
    layer(xs[0]).square().sum().backward()  # capture off: nothing recorded
    assert layer.effective_grad() is None and layer.lora_B.grad is not None
    layer.capture_grad = True
    for x in xs:
        layer(x).square().sum().backward()
        ref(x).square().sum().backward()
    assert torch.allclose(layer.effective_grad(), ref.weight.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no graph, no hook, no error
        layer(xs[0])
    layer.reset_effective_grad()
    assert layer.effective_grad() is None
    # full mode: the gradient is weight.grad
    layer.switch_to_full()
    layer(xs[0]).sum().backward()
    assert layer.effective_grad() is layer.weight.grad


@pytest.mark.parametrize("checkpointing", [False, True])
def test_effective_grad_in_a_gpt_matches_the_folded_model(checkpointing):
    model = _gpt()
    name = "transformer.h.0.attn.c_attn"
    layer = AdaptiveSVDLinear(model.get_submodule(name))
    model.swap_module(name, layer)
    layer.switch_to_lowrank(20)
    ref = copy.deepcopy(model)
    assert fold_svd_layers(ref) == 1
    for m in (model, ref):
        m.train()
        m.set_grad_checkpointing(checkpointing)
    layer.capture_grad = True
    for seed in (1, 2):  # gradient accumulation over two micro-batches
        idx = _tokens(seed)
        model(idx, idx)[1].backward()
        ref(idx, idx)[1].backward()
    assert torch.allclose(layer.effective_grad(), ref.get_submodule(name).weight.grad, rtol=1e-4, atol=1e-6)


def test_update_snapshot_is_the_svd_of_the_effective_weight():
    layer = AdaptiveSVDLinear(_linear())
    assert layer.snapshot is None
    layer.switch_to_lowrank(4)
    U, S, Vh = layer.update_snapshot()
    assert layer.snapshot[0] is U and U.shape == (40, 40) and S.shape == (40,) and Vh.shape == (40, 48)
    ref = torch.linalg.svdvals(layer.effective_weight().double())
    assert torch.allclose(S.double(), ref, atol=1e-5)
    assert torch.allclose((U * S) @ Vh, layer.effective_weight(), atol=1e-5)
    assert {"svd_U", "svd_S", "svd_Vh"} <= set(layer.state_dict())
    with pytest.raises(ValueError, match="shapes"):
        layer.update_snapshot(svd=(U[:, :3], S, Vh))


def test_svd_routing_decision():
    cpu = torch.device("cpu")
    assert svd_device_for(torch.device("mps"), "auto") == cpu
    assert svd_device_for(torch.device("mps:0"), "mps") == cpu
    assert svd_device_for(torch.device("cuda:1"), "auto") == torch.device("cuda:1")
    assert svd_device_for(torch.device("cuda:0"), "cpu") == cpu
    assert svd_device_for(cpu, "auto") == cpu
    with pytest.raises(Exception, match="svd.svd_device: 'not a device'"):
        svd_device_for(cpu, "not a device")


def test_svd_runs_where_routed_in_float32_and_returns_to_the_tensor(monkeypatch):
    calls = []
    real = torch.linalg.svd

    def spy(x, full_matrices=True):
        calls.append((x.device, x.dtype))
        return real(x, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    monkeypatch.setattr(sl, "has_svd", lambda device: torch.device(device).type not in ("mps", "cpu"))
    w = torch.randn(24, 16, dtype=torch.float64, requires_grad=True)
    U, S, Vh = svd(w, "cpu")  # the predicate says no: falls back to the CPU all the same
    assert calls == [(torch.device("cpu"), torch.float32)]
    assert all(t.device == w.device and t.dtype == torch.float32 and not t.requires_grad for t in (U, S, Vh))
    U0, S0, Vh0 = real(w.detach().float(), full_matrices=False)
    assert torch.equal(S, S0) and torch.equal(U, U0) and torch.equal(Vh, Vh0)
    bad = torch.full((3, 3), float("nan"))
    with pytest.raises(TrainingError, match="SVD of a"):
        svd(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_svd_routing_on_cuda(monkeypatch):
    w = torch.randn(64, 48, device="cuda")
    direct = torch.linalg.svdvals(w)
    monkeypatch.setattr(sl, "has_svd", lambda device: torch.device(device).type == "cpu")
    U, S, Vh = svd(w)  # the device "lacks" SVD: computed on the CPU, returned to CUDA
    assert U.device == w.device and S.device == w.device
    assert torch.allclose(S, direct, atol=1e-4) and torch.allclose((U * S) @ Vh, w, atol=1e-4)
    layer = AdaptiveSVDLinear(nn.Linear(48, 64, device="cuda"))
    layer.switch_to_lowrank(9, svd="cpu")
    assert layer.lora_B.device == w.device and layer.weight_principal.device == w.device


def _svd_model():
    """A tiny GPT with layer 0's c_attn low-rank at r=5 (trained a little) and layer 1's
    c_attn switched to low-rank and back, both with snapshots."""
    model = _gpt()
    for i in (0, 1):
        name = f"transformer.h.{i}.attn.c_attn"
        model.swap_module(name, AdaptiveSVDLinear(model.get_submodule(name)))
    l0, l1 = (model.get_submodule(f"transformer.h.{i}.attn.c_attn") for i in (0, 1))
    l0.switch_to_lowrank(5)
    l1.switch_to_lowrank(9)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    idx = _tokens()
    model(idx, idx)[1].backward()
    opt.step()
    l1.switch_to_full()
    l0.update_snapshot()
    l1.update_snapshot()
    return model


def test_checkpoint_round_trip_through_the_load_adapter():
    model = _svd_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = _gpt(seed=123)
    assert fresh.load_state_dict_flexible(state, strict=True) is not None
    idx = _tokens(7)
    model.eval(), fresh.eval()
    assert torch.equal(model(idx)[0], fresh(idx)[0])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
           {n: p.requires_grad for n, p in fresh.named_parameters()}
    for i, (mode, r) in enumerate([("lowrank", 5), ("full", 9)]):
        layer = fresh.get_submodule(f"transformer.h.{i}.attn.c_attn")
        assert isinstance(layer, AdaptiveSVDLinear) and (layer.mode, layer.r) == (mode, r)
        assert torch.equal(layer.svd_S, model.get_submodule(f"transformer.h.{i}.attn.c_attn").svd_S)
    assert fresh.state_dict().keys() == model.state_dict().keys()


def test_load_adapter_refits_a_model_already_swapped_at_another_r():
    state = _svd_model().state_dict()
    fresh = _gpt(seed=5)
    name = "transformer.h.0.attn.c_attn"
    layer = AdaptiveSVDLinear(fresh.get_submodule(name))
    fresh.swap_module(name, layer)
    layer.switch_to_lowrank(11)
    fresh.load_state_dict_flexible(state, strict=True)
    assert fresh.get_submodule(name) is layer and layer.r == 5 and layer.lora_B.shape[1] == 5
    # a plain checkpoint leaves a plain model plain
    plain = _gpt(seed=6)
    before = set(plain.state_dict())
    plain.load_state_dict_flexible(_gpt(seed=7).state_dict(), strict=True)
    assert set(plain.state_dict()) == before
    assert sl._adapt_svd_layers in LOAD_ADAPTERS


def test_plain_load_state_dict_sets_mode_r_and_trainability():
    a, b = AdaptiveSVDLinear(_linear(seed=1)), AdaptiveSVDLinear(_linear(seed=2))
    a.switch_to_lowrank(5)
    b.switch_to_lowrank(5)
    b.switch_to_full()
    a.load_state_dict(b.state_dict())
    assert (a.mode, a.r) == ("full", 5)
    assert a.weight.requires_grad and not a.lora_B.requires_grad and not a.lora_A.requires_grad
    x = torch.randn(3, 48)
    assert torch.equal(a(x), b(x))


def test_fold_gives_a_plain_model_with_the_same_logits():
    model = _svd_model()
    idx = _tokens(3)
    model.eval()
    before = model(idx)[0]
    assert fold_svd_layers(model) == 2
    assert not any(isinstance(m, AdaptiveSVDLinear) for m in model.modules())
    assert (model(idx)[0] - before).abs().max() < 1e-6
    assert set(model.state_dict()) == set(_gpt().state_dict())
    assert fold_svd_layers(model) == 0


def test_flops_per_token_unchanged_by_the_swap_and_the_mode():
    model = _gpt()
    flops = model.flops_per_token()
    name = "transformer.h.1.mlp.c_fc"
    layer = AdaptiveSVDLinear(model.get_submodule(name))
    model.swap_module(name, layer)
    layer.switch_to_lowrank(8)
    assert model.flops_per_token() == flops


def test_builds_on_the_meta_device():
    layer = AdaptiveSVDLinear(nn.Linear(256, 768, bias=False, device="meta"))
    assert layer.svd_mode.device.type == "meta" and layer.mode == "full" and layer.matmul_params() == 256 * 768
