"""``training.optimizer: muon`` (nanochat's Muon + AdamW as one optimizer), its momentum warmup,
``schedule: warmdown``, and bitwise resume with them (issue 10)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from test_resume import ONE_THREAD, assert_same_state, train_losses

from lmkit.config import GPTConfig, TrainConfig
from lmkit.models import build_model
from lmkit.training.optim import MuonAdamW, build_optimizer, muon_momentum
from lmkit.training.schedule import build_scheduler, lr_multiplier

from conftest import run_cli

CPU = torch.device("cpu")
NANO = dict(n_layer=2, n_head=2, n_embd=32, d_ff=64, block_size=16, vocab_size=53, pos_encoding="rope",
            norm="rmsnorm", norm_affine=False, qk_norm=True, embed_norm=True, activation="relu2", qkv="separate",
            bias=False, tie_embeddings=False, logit_softcap=15.0, init="nanochat", dropout=0.0)
MUON = dict(optimizer="muon", lr=0.02, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, schedule="warmdown",
            warmup_steps=0, warmdown_ratio=0.2, min_lr_ratio=0.0)


def tiny_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = build_model(GPTConfig(**{**NANO, **kw}))
    with torch.no_grad():  # nanochat's init zeroes c_proj and lm_head; random weights exercise every path
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 53, (4, 16), generator=g), torch.randint(0, 53, (4, 16), generator=g)


# ---- transcriptions of nanochat's scripts/base_train.py (Nov 2025) ---------------------------------

def nanochat_get_lr_multiplier(it, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    elif it <= num_iterations - warmdown_iters:
        return 1.0
    else:
        progress = (num_iterations - it) / warmdown_iters
        return progress * 1.0 + (1 - progress) * final_lr_frac


def nanochat_get_muon_momentum(it):
    frac = min(it / 300, 1)
    momentum = (1 - frac) * 0.85 + frac * 0.95
    return momentum


# ---- the combined optimizer against the two torch optimizers stepped separately ---------------------

def test_one_optimizer_equals_torch_muon_and_adamw_stepped_separately():
    steps = 8  # the last two in the warmdown (ratio 0.25); one layer: bf16 matmuls are slow on CPUs
    a = tiny_model(n_layer=1)
    b = copy.deepcopy(a)
    opt = build_optimizer(a, TrainConfig(max_steps=steps, **MUON), CPU)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, MuonAdamW)
    sched = build_scheduler(opt, schedule="warmdown", warmup_steps=0, total_steps=steps, min_lr_ratio=0.0,
                            warmdown_ratio=0.25)
    # nanochat's setup_optimizers on model b: Muon over the blocks' matrices, AdamW over lm_head and wte
    scale = (32 / 768) ** -0.5
    matrices = list(b.transformer.h.parameters())
    muon = torch.optim.Muon(matrices, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=5,
                            adjust_lr_fn="original")
    adamw = torch.optim.AdamW([{"params": [b.lm_head.weight], "lr": 0.004 * scale},
                               {"params": [b.transformer.wte.weight], "lr": 0.2 * scale}],
                              betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, fused=True)  # nanochat: fused=True
    for o in (muon, adamw):
        for g in o.param_groups:
            g["initial_lr"] = g["lr"]
    assert len(opt.param_groups) == 3 and sum(len(g["params"]) for g in opt.param_groups) == len(list(a.parameters()))
    for step in range(steps):
        x, y = batch(step)
        for model in (a, b):
            model(x, y)[1].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lrm = nanochat_get_lr_multiplier(step, steps, 0.0, 0.25, 0.0)
        for o in (adamw, muon):
            for g in o.param_groups:
                g["lr"] = g["initial_lr"] * lrm
        for g in muon.param_groups:
            g["momentum"] = nanochat_get_muon_momentum(step)
        assert sorted(g["lr"] for g in opt.param_groups) == sorted(g["lr"] for o in (muon, adamw)
                                                                   for g in o.param_groups)
        opt.step()
        adamw.step()
        muon.step()
        opt.zero_grad(set_to_none=True)
        b.zero_grad(set_to_none=True)
        sched.step()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb), step
    assert opt.steps_taken == steps
    assert lrm < 1.0  # the warmdown was reached


def _nanochat_muon_update(p, g, lr, momentum):
    """One step of nanochat's own Muon (nanochat/muon.py, without torch.compile) on a fresh buffer."""
    a_, b_, c_ = (3.4445, -4.7750, 2.0315)
    buf = torch.zeros_like(g)
    buf.lerp_(g, 1 - momentum)
    g = g.lerp_(buf, momentum)
    X = g.bfloat16()
    if g.size(-2) > g.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        A = X @ X.mT
        B = b_ * A + c_ * A @ A
        X = a_ * X + B @ X
    if g.size(-2) > g.size(-1):
        X = X.mT
    return p - lr * max(1, p.size(-2) / p.size(-1)) ** 0.5 * X


@pytest.mark.parametrize("shape", [(64, 16), (16, 64)])
def test_adjust_lr_original_is_nanochats_muon_scaling(shape):
    torch.manual_seed(0)
    p0 = torch.randn(shape)
    g = torch.randn(shape)
    theirs = _nanochat_muon_update(p0.clone(), g.clone(), 0.02, 0.95) - p0
    deltas = {}
    for fn in ("original", "match_rms_adamw"):
        p = torch.nn.Parameter(p0.clone())
        p.grad = g.clone()
        torch.optim.Muon([p], lr=0.02, weight_decay=0.0, momentum=0.95, adjust_lr_fn=fn).step()
        deltas[fn] = p.detach() - p0
    # bf16 Newton-Schulz summed in a different order: the same direction to 1e-3, sizes to 1%
    cos = torch.nn.functional.cosine_similarity(deltas["original"].flatten(), theirs.flatten(), dim=0)
    assert cos > 0.998
    ratio = {fn: float(d.norm() / theirs.norm()) for fn, d in deltas.items()}
    assert ratio["original"] == pytest.approx(1.0, abs=0.01)
    assert abs(ratio["match_rms_adamw"] - 1.0) > 0.15  # 0.2·sqrt(max(A, B)): 0.8 and 1.6 here


def test_momentum_warmup_values():
    for step, expected in ((0, 0.85), (150, 0.90), (300, 0.95), (450, 0.95)):
        assert muon_momentum(step) == pytest.approx(expected, abs=1e-12)
        assert muon_momentum(step) == nanochat_get_muon_momentum(step)
    p = torch.nn.Parameter(torch.randn(4, 4))
    emb = torch.nn.Parameter(torch.randn(3))
    opt = MuonAdamW(torch.optim.Muon([p], lr=0.01, weight_decay=0.0), torch.optim.AdamW([emb], lr=0.01))
    used = []
    for _ in range(301):
        p.grad = torch.ones(4, 4)
        emb.grad = torch.ones(3)
        opt.step()
        used.append(opt.muon.param_groups[0]["momentum"])  # what this step ran with
    assert used[0] == 0.85 and used[150] == pytest.approx(0.90) and used[300] == pytest.approx(0.95)
    assert opt.state_dict()["steps_taken"] == 301 and opt.momentum() == pytest.approx(0.95)


def test_groups_state_mapping_and_a_rebuild_after_a_swap():
    model = tiny_model()
    opt = build_optimizer(model, TrainConfig(max_steps=5, **MUON), CPU)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in opt.muon.param_groups[0]["params"]}
    assert muon_names == {n for n, _ in model.named_parameters() if n.startswith("transformer.h.")}
    assert [g["name"] for g in opt.adamw.param_groups] == ["head", "embedding"]
    assert opt.adamw.param_groups[1]["lr"] == pytest.approx(0.2 * (32 / 768) ** -0.5)
    assert opt.muon.defaults["weight_decay"] == 0.0 and opt.muon.defaults["nesterov"] is True
    x, y = batch(0)
    model(x, y)[1].backward()
    opt.step()
    wq = model.transformer.h[0].attn.c_q.weight
    assert wq in opt.state and "momentum_buffer" in opt.state[wq]
    # what adaptive SVD does: freeze a weight, add 2-D factors inside the block, rebuild
    attn = model.transformer.h[0].attn
    wq.requires_grad_(False)
    attn.c_q.lora_A = torch.nn.Parameter(torch.randn(4, 32))
    attn.c_q.lora_B = torch.nn.Parameter(torch.randn(32, 4))
    new = build_optimizer(model, TrainConfig(max_steps=5, **MUON), CPU)
    muon_params = new.muon.param_groups[0]["params"]
    assert not any(p is wq for g in new.param_groups for p in g["params"])
    assert any(p is attn.c_q.lora_A for p in muon_params) and any(p is attn.c_q.lora_B for p in muon_params)
    # Trainer.rebuild_optimizer's copy of the surviving parameters' state
    for group in new.param_groups:
        for param in group["params"]:
            if param in opt.state:
                new.state[param] = opt.state[param]
    wk = attn.c_k.weight
    assert new.state[wk] is opt.state[wk] and attn.c_q.lora_A not in new.state
    assert new.state[model.lm_head.weight]["step"] == 1
    with pytest.raises(KeyError):
        new.state[wq] = {}
    # the warmup position carries over when the caller hands it on
    assert new.steps_taken == 0 and new.muon.param_groups[0]["momentum"] == 0.85
    new.steps_taken = opt.steps_taken
    assert new.muon.param_groups[0]["momentum"] == muon_momentum(1)


def test_lambda_lr_grad_scaler_and_a_skipped_step():
    model = tiny_model()
    ref = copy.deepcopy(model)
    opt = build_optimizer(model, TrainConfig(max_steps=10, **MUON), CPU)
    ref_opt = build_optimizer(ref, TrainConfig(max_steps=10, **MUON), CPU)
    sched = build_scheduler(opt, schedule="warmdown", warmup_steps=0, total_steps=10, min_lr_ratio=0.0)
    ref_sched = build_scheduler(ref_opt, schedule="warmdown", warmup_steps=0, total_steps=10, min_lr_ratio=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for step in range(10):
        x, y = batch(step)
        scaler.scale(model(x, y)[1]).backward()
        scaler.unscale_(opt)
        ref(x, y)[1].backward()
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)
            p.grad.copy_(q.grad)  # keep the two runs on the same numbers
        scaler.step(opt)
        scaler.update()
        ref_opt.step()
        for o, s in ((opt, sched), (ref_opt, ref_sched)):
            o.zero_grad()
            s.step()
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(g["initial_lr"] * lr_multiplier(
                step + 1, schedule="warmdown", warmup_steps=0, total_steps=10, min_lr_ratio=0.0))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))
    # a non-finite gradient: GradScaler skips the step, and the warmup does not advance
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(99)
    scaler.scale(model(x, y)[1]).backward()
    model.lm_head.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert opt.steps_taken == 10 and all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_state_dict_round_trip_continues_bitwise():
    def run(model, opt, steps):
        for step in steps:
            x, y = batch(step)
            model(x, y)[1].backward()
            opt.step()
            opt.zero_grad()

    model = tiny_model()
    opt = build_optimizer(model, TrainConfig(max_steps=6, **MUON), CPU)
    run(model, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run(model, opt, range(3, 6))

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    again = tiny_model(seed=7)  # different weights until the load
    again.load_state_dict(saved["model"])
    opt2 = build_optimizer(again, TrainConfig(max_steps=6, **MUON), CPU)
    opt2.load_state_dict(saved["opt"])
    assert opt2.steps_taken == 3 and opt2.muon.param_groups[0]["momentum"] == muon_momentum(3)
    run(again, opt2, range(3, 6))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(), strict=True))
    assert opt.state_dict()["steps_taken"] == opt2.state_dict()["steps_taken"] == 6

    adamw = build_optimizer(again, TrainConfig(max_steps=6), CPU)
    with pytest.raises(ValueError, match="not a Muon"):
        opt2.load_state_dict(adamw.state_dict())


# ---- schedule: warmdown --------------------------------------------------------------------------

@pytest.mark.parametrize(("total", "warmup_ratio", "warmdown_ratio", "final"), [
    (100, 0.0, 0.2, 0.0), (17, 0.0, 0.2, 0.0), (1000, 0.05, 0.2, 0.1), (30, 0.1, 0.35, 0.0), (12, 0.0, 0.5, 0.25),
    (40, 0.0, 0.0, 0.0), (30, 0.0, 0.05, 0.0), (50, 0.0, 0.25, 0.0)])  # round(1.5) = 2, round(12.5) = 12
def test_warmdown_equals_nanochats_get_lr_multiplier(total, warmup_ratio, warmdown_ratio, final):
    warmup = round(warmup_ratio * total)
    for it in range(total):
        ours = lr_multiplier(it, schedule="warmdown", warmup_steps=warmup, total_steps=total, min_lr_ratio=final,
                             warmup_form="(s+1)/W", warmdown_ratio=warmdown_ratio)
        assert ours == nanochat_get_lr_multiplier(it, total, warmup_ratio, warmdown_ratio, final), it
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = build_scheduler(opt, schedule="warmdown", warmup_steps=warmup, total_steps=total, min_lr_ratio=final,
                            warmup_form="(s+1)/W", warmdown_ratio=warmdown_ratio)
    for it in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(
            0.5 * nanochat_get_lr_multiplier(it, total, warmup_ratio, warmdown_ratio, final))
        opt.step()
        sched.step()


# ---- resume ---------------------------------------------------------------------------------------

NANO_RESUME = """\
model: {n_layer: 1, n_head: 2, n_embd: 32, d_ff: 128, block_size: 32, pos_encoding: rope, norm: rmsnorm,
        norm_affine: false, layer_norm_eps: 1.1920928955078125e-07, embed_norm: true, qk_norm: true,
        activation: relu2, qkv: separate, bias: false, tie_embeddings: false, logit_softcap: 15.0, init: nanochat,
        dropout: 0.0}
data:
  dataset: arithmetic
  tokenizer: char
  arithmetic: {n_train: 256, n_val: 32, n_test_flat: 8, n_test_paren: 8}
training:
  batch_size: 16
  grad_accum_steps: 2
  max_steps: 12
  optimizer: muon
  lr: 0.02
  betas: [0.8, 0.95]
  eps: 1.0e-10
  weight_decay: 0.0
  muon_momentum_warmup_steps: 30
  schedule: warmdown
  warmup_steps: 0
  warmup_form: "(s+1)/W"
  warmdown_ratio: 0.2
  min_lr_ratio: 0.0
  log_interval: 1
  eval_interval: 6
  eval_iters: 2
  checkpoint_interval: 4
  keep_last: 2
  seed: 5
"""


def test_bitwise_resume_after_sigterm_with_muon_and_warmdown(tmp_path):
    preset = tmp_path / "nano.yaml"
    preset.write_text(NANO_RESUME)
    straight = run_cli("train", "--preset", str(preset), "--name", "straight", cwd=tmp_path, env=ONE_THREAD)
    assert straight.returncode == 0, straight.stderr
    stopped = run_cli("train", "--preset", str(preset), "--name", "cut", cwd=tmp_path,
                      env={**ONE_THREAD, "LMKIT_TEST_SIGNAL": "9:SIGTERM"})
    assert stopped.returncode == 143, stopped.stderr
    cut = torch.load(tmp_path / "runs/cut/checkpoints/latest.pt", weights_only=True)
    assert cut["step"] == 5 and cut["optimizer"]["steps_taken"] == 5
    resumed = run_cli("resume", "runs/cut", cwd=tmp_path, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    runs = tmp_path / "runs"
    assert_same_state(runs / "straight/checkpoints/latest.pt", runs / "cut/checkpoints/latest.pt")
    assert train_losses(runs / "cut") == train_losses(runs / "straight")
    final = torch.load(runs / "cut/checkpoints/latest.pt", weights_only=True)["optimizer"]
    assert final["steps_taken"] == 12
    assert final["param_groups"][0]["momentum"] == muon_momentum(11, warmup_steps=30)  # the last step's
    assert final["param_groups"][0]["lr"] == pytest.approx(0.0)  # warmdown to 0 after the last step
