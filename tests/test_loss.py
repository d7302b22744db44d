"""The shared LM loss (lmkit.models.loss): its CPU route against ATen's F.cross_entropy and
torch.autograd.gradcheck (independent references), and where each route is taken."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmkit.models import loss as loss_mod
from lmkit.models.loss import _CrossEntropyGradInForward, cross_entropy


def _reference(logits: torch.Tensor, targets: torch.Tensor, weight: float = 1.0):
    z = logits.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(z.reshape(-1, z.size(-1)), targets.reshape(-1), ignore_index=-100)
    (loss * weight).backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("shape", [(2, 7, 13), (3, 50, 1000), (1, 600, 4099)])
def test_matches_f_cross_entropy_value_and_gradient(shape, monkeypatch):
    monkeypatch.setattr(loss_mod, "_BLOCK_ELEMENTS", 5000)  # several blocks, the last one partial
    torch.manual_seed(0)
    logits = torch.randn(*shape) * 4
    targets = torch.randint(0, shape[-1], shape[:-1])
    targets[..., ::5] = -100  # some targets are not counted
    z = logits.clone().requires_grad_(True)
    loss = cross_entropy(z, targets)
    assert loss.grad_fn is not None and "CrossEntropyGradInForward" in type(loss.grad_fn).__name__
    (loss * 0.37).backward()  # the loop scales each micro-batch's loss by its share of the targets
    ref_loss, ref_grad = _reference(logits, targets, 0.37)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z.grad, ref_grad, rtol=1e-5, atol=1e-8)


def test_gradient_agrees_with_finite_differences():
    torch.manual_seed(1)
    logits = torch.randn(6, 11, dtype=torch.float64)
    targets = torch.tensor([0, 3, -100, 10, 5, 5])
    z = logits.clone().requires_grad_(True)
    _CrossEntropyGradInForward.apply(z, targets).backward()
    h, numeric = 1e-6, torch.empty_like(logits)
    with torch.no_grad():
        for idx in range(logits.numel()):  # central differences, one element at a time
            e = torch.zeros_like(logits).view(-1)
            e[idx] = h
            e = e.view_as(logits)
            up = _CrossEntropyGradInForward.apply(logits + e, targets)
            down = _CrossEntropyGradInForward.apply(logits - e, targets)
            numeric.view(-1)[idx] = (up - down) / (2 * h)
    torch.testing.assert_close(z.grad, numeric, rtol=1e-6, atol=1e-9)


def test_a_second_backward_through_the_same_graph_is_refused_not_wrong():
    z = torch.randn(3, 8, requires_grad=True)
    loss = cross_entropy(z, torch.tensor([1, 2, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()  # the gradient buffer was scaled in place: torch's version counter catches it


def test_every_target_ignored_gives_nan_and_a_zero_gradient_like_aten():
    logits = torch.randn(4, 9, requires_grad=True)
    targets = torch.full((4,), -100)
    loss = cross_entropy(logits, targets)
    loss.backward()
    ref_loss, ref_grad = _reference(logits, targets)
    assert math.isnan(loss.item()) and math.isnan(ref_loss.item())
    assert torch.equal(logits.grad, ref_grad) and not logits.grad.any()


def test_routes_without_a_backward_or_off_fp32_use_aten():
    logits = torch.randn(2, 5, 17)
    targets = torch.randint(0, 17, (2, 5))
    ref = F.cross_entropy(logits.view(-1, 17), targets.view(-1))
    with torch.no_grad():
        assert torch.equal(cross_entropy(logits.requires_grad_(True), targets), ref)
    assert cross_entropy(logits.detach(), targets).grad_fn is None  # eval: nothing to differentiate
    half = cross_entropy(logits.detach().bfloat16().requires_grad_(True), targets)
    assert "CrossEntropyGradInForward" not in type(half.grad_fn).__name__
