"""LR schedule values and that the scheduler steps once per optimizer step."""

import math

import pytest
import torch

from lmkit.training.schedule import build_scheduler, lr_multiplier


def mult(step, schedule="cosine", warmup=5, total=20, m=0.1):
    return lr_multiplier(step, schedule=schedule, warmup_steps=warmup, total_steps=total, min_lr_ratio=m)


def test_cosine_test_vector_from_seed_001():
    # SEEDS_SPEC 5.2: W=5, S=20, m=0.1 -> 0.775 at step 10.
    assert mult(10) == pytest.approx(0.775)


def test_warmup_is_linear_from_zero():
    assert [mult(s) for s in range(5)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert mult(5) == pytest.approx(1.0)


def test_cosine_ends_at_min_ratio_and_stays():
    assert mult(20) == pytest.approx(0.1)
    assert mult(25) == pytest.approx(0.1)
    values = [mult(s) for s in range(5, 21)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_linear_decays_to_zero_like_seed_000():
    # seed 000: warmup 100, then linear to 0 at the last step.
    assert lr_multiplier(100, schedule="linear", warmup_steps=100, total_steps=300, min_lr_ratio=0.0) == 1.0
    assert lr_multiplier(200, schedule="linear", warmup_steps=100, total_steps=300, min_lr_ratio=0.0) == 0.5
    assert lr_multiplier(300, schedule="linear", warmup_steps=100, total_steps=300, min_lr_ratio=0.0) == 0.0


def test_constant():
    assert mult(3, "constant") == pytest.approx(0.6)
    assert mult(7, "constant") == 1.0
    assert mult(1000, "constant") == 1.0


def test_no_warmup():
    assert mult(0, warmup=0) == 1.0
    assert mult(10, warmup=0, total=20) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_unknown_schedule():
    with pytest.raises(ValueError):
        mult(1, "exponential")


def test_lambda_lr_sets_optimizer_lr():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = build_scheduler(opt, schedule="cosine", warmup_steps=5, total_steps=20, min_lr_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[10] == pytest.approx(0.775)
    assert sched.last_epoch == 20
