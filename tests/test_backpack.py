"""Backpack families (issue 11): the paper's Backpack (Hewitt et al., ACL 2023, arXiv 2305.16765)
checked against naive loops written from the paper's formulas and the reference layout, and the
d40efde BackpackLegacy against a transcription of that repository's forward pass (written here,
not in the package); presets' parameter counts; the model interface (KV cache, FLOPs, gradient
checkpointing, autocast); a short training run that resumes bitwise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmkit.config import available_presets, build_run_config
from lmkit.config.backpack import BackpackConfig, BackpackLegacyConfig
from lmkit.errors import ConfigError
from lmkit.models import build_model
from lmkit.models.base import LanguageModel

from conftest import shared

V = 40


def bp_cfg(**kw) -> BackpackConfig:
    base = dict(n_layer=2, n_head=2, n_embd=16, n_senses=4, d_ff=32, block_size=12, vocab_size=V, dropout=0.0,
                bias=True)
    return BackpackConfig(**{**base, **kw})


def legacy_cfg(**kw) -> BackpackLegacyConfig:
    base = dict(n_layer=2, n_head=2, n_embd=16, n_senses=4, d_ff=64, block_size=12, vocab_size=V, dropout=0.0,
                bias=False)
    return BackpackLegacyConfig(**{**base, **kw})


def spread(model, std=0.3, seed=0):
    """Larger random weights than the 0.02 init, so that α and the sense weights are far from
    uniform and every LayerNorm gain/bias matters."""
    g = torch.Generator().manual_seed(seed)
    gains = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if id(p) in gains else 0.0))
    return model.eval()


def ids(B=2, T=12, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------
# The paper's Backpack, against loops written from the formulas
# --------------------------------------------------------------------------------------


def naive_senses(model, x):
    """C(x) by hand from the parameters, in the reference layout: e -> LN -> r = LN(e) + e ->
    r + MLP(LN_1 r) -> LN_2 -> MLP d->4d->k·d (dropout off). x (N,) -> (N, k, d)."""
    sn, d = model.sense_network, model.config.n_embd

    def ln(mod, t):
        return F.layer_norm(t, (d,), mod.weight, mod.bias, mod.eps)

    def mlp(m, t):
        return F.linear(F.gelu(F.linear(t, m.c_fc.weight, m.c_fc.bias)), m.c_proj.weight, m.c_proj.bias)

    e = model.transformer.wte.weight[x]
    r = ln(sn.ln, e) + e
    r = r + mlp(sn.block.mlp, ln(sn.block.ln_1, r))
    return mlp(sn.final_mlp, ln(sn.block.ln_2, r)).view(len(x), model.config.n_senses, d)


def final_hidden(model, idx):
    out = {}
    hook = model.transformer.ln_f.register_forward_hook(lambda m, i, o: out.setdefault("h", o))
    try:
        model(idx)
    finally:
        hook.remove()
    return out["h"]


def naive_alpha_and_o(model, idx):
    """α_ℓ[i, j] = exp(s_ij) / Σ_{j' <= i} exp(s_ij') with s = q_iℓ·k_jℓ/sqrt(d/k), q, k the two
    halves of c_attn(h), and o_i = Σ_ℓ Σ_{j<=i} α_ℓ[i, j] C(x_j)_ℓ, one number at a time."""
    cfg = model.config
    d, k = cfg.n_embd, cfg.n_senses
    dh = d // k
    h = final_hidden(model, idx)
    lin = model.sense_weight_net.c_attn
    qk = F.linear(h, lin.weight, lin.bias)
    B, T = idx.shape
    alpha = torch.zeros(B, k, T, T, dtype=torch.float64)
    o = torch.zeros(B, T, d, dtype=torch.float64)
    for b in range(B):
        senses = naive_senses(model, idx[b]).double()
        for ell in range(k):
            q = qk[b, :, ell * dh:(ell + 1) * dh].double()
            kk = qk[b, :, d + ell * dh:d + (ell + 1) * dh].double()
            for i in range(T):
                scores = [float((q[i] @ kk[j]).detach()) / math.sqrt(dh) for j in range(i + 1)]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for j in range(i + 1):
                    alpha[b, ell, i, j] = weights[j] / total
                    o[b, i] += alpha[b, ell, i, j] * senses[j, ell]
    return alpha, o


@pytest.fixture(scope="module")
def reference():
    """A tiny Backpack with spread weights, its input, and the naive loops' α and o (computed once)."""
    model = spread(build_model(bp_cfg()))
    idx = ids()
    alpha, o = naive_alpha_and_o(model, idx)
    return model, idx, alpha, o


def test_alpha_is_causal_non_negative_sums_to_one_and_matches_the_formula(reference):
    model, idx, naive, _ = reference
    alpha = model.contextualization(idx)
    assert alpha.shape == (2, 4, 12, 12) and alpha.dtype == torch.float32
    future = torch.ones(12, 12, dtype=torch.bool).triu(1)
    assert torch.all(alpha[..., future] == 0)  # exactly causal
    assert torch.all(alpha >= 0)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 4, 12))  # per sense and position
    torch.testing.assert_close(alpha.double(), naive, atol=1e-5, rtol=1e-4)
    assert alpha[:, 0].std() > 0.05 and not torch.allclose(alpha[:, 0], alpha[:, 1])  # not uniform, per sense
    # α depends on the tokens (the legacy variant's weights do not)
    other = idx.clone()
    other[:, 0] = (other[:, 0] + 1) % V
    assert not torch.allclose(model.contextualization(other)[:, :, 5], alpha[:, :, 5])


def test_output_is_the_alpha_weighted_sum_of_sense_vectors_and_logits_are_E_o(reference):
    model, idx, _, naive_o = reference
    o, _ = model(idx, return_hidden=True)
    torch.testing.assert_close(o.double(), naive_o, atol=1e-4, rtol=1e-4)
    # sense vectors: the model's and the hand-written reference layout's
    torch.testing.assert_close(model.sense_vectors(idx[0]), naive_senses(model, idx[0]), atol=1e-5, rtol=1e-5)
    logits, _ = model(idx)
    E = model.input_embedding().weight
    assert model.output_head().weight is E and model.tied_embeddings
    torch.testing.assert_close(logits, o @ E.T)
    # the projection of the senses onto the output space
    torch.testing.assert_close(model.sense_logits(idx[0]), naive_senses(model, idx[0]) @ E.T, atol=1e-4, rtol=1e-4)


def test_zeroing_all_senses_but_one_gives_that_senses_contribution(reference):
    model, idx, alpha, _ = reference
    E = model.input_embedding().weight.double()
    total = 0
    for ell in range(4):
        with model.scale_senses(F.one_hot(torch.tensor(ell), 4).float()):
            logits, _ = model(idx)
        part = torch.zeros(2, 12, 16, dtype=torch.float64)
        for b in range(2):
            senses = naive_senses(model, idx[b]).double()
            part[b] = alpha[b, ell] @ senses[:, ell]
        torch.testing.assert_close(logits.double(), part @ E.T, atol=1e-4, rtol=1e-4)
        total = total + logits
    torch.testing.assert_close(total, model(idx)[0], atol=1e-4, rtol=1e-4)  # the senses add up
    # per (source token, sense): halving sense 2 of one word changes only what that word contributes
    w = int(idx[0, 3])
    factors = torch.ones(V, 4)
    factors[w, 2] = 0.5
    with model.scale_senses(factors):
        o_scaled, _ = model(idx, return_hidden=True)
    expect = torch.zeros(2, 12, 16, dtype=torch.float64)
    for b in range(2):
        senses = naive_senses(model, idx[b]).double()
        for j in range(12):
            for ell in range(4):
                f = 0.5 if (int(idx[b, j]) == w and ell == 2) else 1.0
                expect[b] += f * alpha[b, ell, :, j, None] * senses[j, ell]
    torch.testing.assert_close(o_scaled.double(), expect, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="shape"):
        with model.scale_senses(torch.ones(3)):
            pass


def test_capture_gives_alpha_senses_and_the_contextualisers_heads(reference):
    model, idx, _, _ = reference
    with model.capture(heads=True, attn_probs=True, alpha=True) as cap:
        o, _ = model(idx, return_hidden=True)
    assert len(cap.heads) == 2 and cap.heads[0].shape == (2, 2, 12, 8)
    assert cap.attn_probs[1].shape == (2, 2, 12, 12)
    torch.testing.assert_close((cap.alpha @ cap.senses).sum(1), o)
    assert cap.senses.shape == (2, 4, 12, 16)


def test_later_tokens_do_not_change_earlier_outputs(reference):
    model, idx, _, _ = reference
    other = idx.clone()
    other[:, 7:] = (other[:, 7:] + 3) % V
    a, _ = model(idx)
    b, _ = model(other)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize(("family", "pos"), [("backpack", "learned"), ("backpack", "rope"),
                                           ("backpack-legacy", "learned")])  # legacy: learned positions only
def test_cached_generation_equals_full_recompute(family, pos):
    from lmkit.evaluation.generate import generate_ex

    cfg = (bp_cfg if family == "backpack" else legacy_cfg)(pos_encoding=pos, block_size=16)
    model = spread(build_model(cfg), std=0.2)
    # step by step with the cache against one full forward
    idx = ids(2, 10)
    full, _ = model(idx)
    cache = model.new_kv_cache(2, 10)
    pieces = [model(idx[:, :4], kv_cache=cache)[0]] + [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    # batched, left-padded generation (prompts of different lengths, rows finishing early)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    cached = generate_ex(model, prompts, max_new_tokens=6, use_cache=True, batch_size=3)
    plain = generate_ex(model, prompts, max_new_tokens=6, use_cache=False, batch_size=3)
    alone = [generate_ex(model, [p], max_new_tokens=6, use_cache=False).tokens[0] for p in prompts]
    assert cached.tokens == plain.tokens == alone


def counted_flops(cfg, T):
    model = build_model(cfg.model_copy(update={"dropout": 0.0}), device="meta").train()
    x = torch.randint(0, cfg.vocab_size, (1, T), device="meta")
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        _, loss = model(x, x)
        loss.backward()
    return counter.get_total_flops() / T


@pytest.mark.parametrize("make", [bp_cfg, legacy_cfg])
def test_flops_per_token_matches_the_flop_counter(make):
    cfg = make(vocab_size=500, n_embd=32, block_size=16)
    model = build_model(cfg, device="meta")
    assert model.flops_per_token() == pytest.approx(counted_flops(cfg, 16), rel=0.01)
    assert model.flops_per_token(8) == pytest.approx(counted_flops(cfg, 8), rel=0.01)


@pytest.mark.parametrize("make", [bp_cfg, legacy_cfg])
def test_grad_checkpointing_and_bf16_autocast(make):
    torch.manual_seed(0)
    model = build_model(make(dropout=0.0)).train()
    idx = ids()

    def grads(ckpt):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        _, loss = model(idx, idx)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss0, g0 = grads(False)
    loss1, g1 = grads(True)
    assert torch.equal(loss0, loss1)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5)
    model.set_grad_checkpointing(False)
    for dtype in (torch.bfloat16, torch.float16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            _, loss = model(idx, idx)
        loss.backward()
        assert abs(loss.item() - loss0.item()) < 0.05 and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("make", [bp_cfg, legacy_cfg])
def test_interface_target_modules_and_param_counts(make):
    model = build_model(make())
    assert isinstance(model, LanguageModel)
    for kind in ("attention", "mlp", "blocks", "head", "all"):
        for name, mod in model.target_modules(kind).items():
            assert model.get_submodule(name) is mod and isinstance(mod, torch.nn.Linear)
    emb = model.input_embedding().weight.numel() + model.position_embedding().weight.numel()
    assert model.num_params(exclude_embeddings=True) == model.num_params() - emb


NANOCHAT = dict(norm="rmsnorm", norm_affine=False, qk_norm=True, activation="relu2", qkv="separate",
                embed_norm=True, init="nanochat", pos_encoding="rope", bias=False)


def test_the_gpt_options_apply_to_the_contextualiser_and_sense_network():
    from lmkit.evaluation.generate import generate_ex

    cfg = bp_cfg(**NANOCHAT)
    model = build_model(cfg)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert "transformer.h.0.attn.c_q" in model.target_modules("attention")
    # 8 norms (2 per block, ln_f, 3 in the sense network) lose their gains; c_q/c_k/c_v hold c_attn's count
    assert model.num_params() == build_model(bp_cfg(bias=False, pos_encoding="rope")).num_params() - 8 * 16
    model.train()
    _, loss = model(ids(), ids())
    loss.backward()
    assert math.isfinite(loss.item())
    meta = build_model(cfg.model_copy(update={"vocab_size": 500, "n_embd": 32}), device="meta")
    assert meta.flops_per_token() == pytest.approx(counted_flops(cfg.model_copy(update={"vocab_size": 500,
                                                                                          "n_embd": 32}), 12), rel=0.01)
    spread(model, std=0.2)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    assert generate_ex(model, prompts, max_new_tokens=5).tokens == \
        generate_ex(model, prompts, max_new_tokens=5, use_cache=False).tokens


def test_config_errors_are_one_line():
    for override, words in (("model.tie_embeddings=false", "tie_embeddings must be true"),
                            ("model.n_senses=5", "multiple of n_senses")):
        with pytest.raises(ConfigError) as exc:
            build_run_config("backpack-tiny", [override])
        assert words in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="pos_encoding must be learned"):
        build_run_config("backpack-europarl-legacy", ["model.pos_encoding=rope"])
    with pytest.raises(ConfigError, match="logit_softcap is not supported"):
        build_run_config("backpack-tiny", ["model.logit_softcap=15"])
    with pytest.raises(ConfigError, match="embed_norm, init is not supported"):
        build_run_config("backpack-europarl-legacy", ["model.embed_norm=true", "model.init=nanochat"])


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "vocab", "expected"), [
    ("backpack-europarl", 250_002, 118_321_920),
    ("backpack-europarl-legacy", 250_002, 1_642_985_488),
    ("transformer-europarl", 250_002, 202_819_968),
    ("backpack-tiny", 2048, 1_418_240),
])
def test_preset_parameter_counts(name, vocab, expected):
    config = build_run_config(name)
    cfg = config.model.model_copy()
    cfg.vocab_size = vocab
    model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == expected == config.target_params
    assert f"{expected:,}" in available_presets()[name].read_text()  # the comment states the count


def test_legacy_and_transformer_differ_by_the_sense_table_and_predictor():
    V_, d, k = 250_002, 384, 16
    assert 1_642_985_488 - 202_819_968 == V_ * d * (k - 1) + (d * d + d + d * k + k)


# --------------------------------------------------------------------------------------
# The legacy variant against a transcription of the original forward pass
# --------------------------------------------------------------------------------------


def original_forward(state, idx, n_head, n_senses, n_layer):
    """kavyavenk/multilingual-backpacks model.py@d40efde BackpackLM.forward (targets=None, all
    positions), eval mode, transcribed with functional ops over its state dict."""
    B, T = idx.shape
    d = state["pos_embeddings.weight"].shape[1]
    sense_embs = state["sense_embeddings.weight"][idx].view(B, T, n_senses, d)
    pos_emb = state["pos_embeddings.weight"][torch.arange(T)]
    context = pos_emb.unsqueeze(0).expand(B, -1, -1)
    w = F.linear(context, state["sense_predictor.0.weight"], state["sense_predictor.0.bias"])
    w = F.linear(F.gelu(w), state["sense_predictor.2.weight"], state["sense_predictor.2.bias"])
    w = F.softmax(w, dim=-1)
    x = torch.einsum("btsd,bts->btd", sense_embs, w) + pos_emb.unsqueeze(0)
    for i in range(n_layer):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (d,), state[p + "ln_1.weight"], state.get(p + "ln_1.bias"))
        q, k, v = F.linear(h, state[p + "attn.c_attn.weight"]).split(d, dim=2)
        q, k, v = (t.view(B, T, n_head, d // n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, d)
        x = x + F.linear(y, state[p + "attn.c_proj.weight"])
        h = F.layer_norm(x, (d,), state[p + "ln_2.weight"], state.get(p + "ln_2.bias"))
        x = x + F.linear(F.gelu(F.linear(h, state[p + "mlp.c_fc.weight"])), state[p + "mlp.c_proj.weight"])
    x = F.layer_norm(x, (d,), state["ln_f.weight"], state.get("ln_f.bias"))
    return F.linear(x, state["lm_head.weight"])


def test_legacy_output_matches_the_original_forward_on_fixed_weights():
    model = spread(build_model(legacy_cfg()), std=0.2, seed=3)
    state = model.state_dict()
    # the original's module names and shapes: its checkpoints load as they are
    assert state["sense_embeddings.weight"].shape == (V, 16 * 4)
    assert state["sense_predictor.0.bias"].shape == (16,) and state["sense_predictor.2.bias"].shape == (4,)
    idx = ids()
    logits, _ = model(idx)
    torch.testing.assert_close(logits, original_forward(state, idx, 2, 4, 2), atol=1e-5, rtol=1e-5)
    # the sense weights depend on the position only
    w = model.sense_weights(torch.arange(12))
    assert w.shape == (12, 4) and torch.allclose(w.sum(-1), torch.ones(12))


def test_legacy_with_one_sense_is_the_transformer_baseline():
    # the original compares k = 16 with k = 1: one sense weight is softmax over one logit = 1, so the
    # model is the untied GPT whose token table is the sense table (plus an unused predictor)
    from lmkit.config import GPTConfig

    legacy = spread(build_model(legacy_cfg(n_senses=1)), std=0.2, seed=5)
    gpt = build_model(GPTConfig(n_layer=2, n_head=2, n_embd=16, d_ff=64, block_size=12, vocab_size=V, dropout=0.0,
                                bias=False, tie_embeddings=False)).eval()
    state = {k.replace("blocks.", "transformer.h."): v for k, v in legacy.state_dict().items()
             if not k.startswith("sense_predictor")}
    state["transformer.wte.weight"] = state.pop("sense_embeddings.weight")
    state["transformer.wpe.weight"] = state.pop("pos_embeddings.weight")
    state["transformer.ln_f.weight"] = state.pop("ln_f.weight")
    gpt.load_state_dict(state)
    idx = ids()
    torch.testing.assert_close(legacy(idx)[0], gpt(idx)[0])


def test_legacy_parameter_formula():
    cfg = legacy_cfg(vocab_size=100, n_embd=24, n_senses=3, n_head=2, block_size=10, d_ff=96)
    d, k, L = 24, 3, 2
    expected = 100 * d * k + 10 * d + L * (12 * d * d + 2 * d) + d + (d * d + d + d * k + k) + 100 * d
    assert build_model(cfg, device="meta").num_params() == expected


# --------------------------------------------------------------------------------------
# Training: a short run on real text, and an exact resume
# --------------------------------------------------------------------------------------


def _train_config(tmp_path, text, name, *overrides):
    preset = tmp_path / "bp.yaml"
    preset.write_text(
        "model: {type: backpack, n_layer: 1, n_head: 2, n_embd: 16, n_senses: 4, block_size: 16, dropout: 0.1}\n"
        f"data: {{dataset: '{text}', tokenizer: byte}}\n"
        "training: {batch_size: 4, max_steps: 8, lr: 3.0e-3, schedule: constant, warmup_steps: 0, log_interval: 1,"
        " eval_interval: 4, eval_iters: 2, checkpoint_interval: 4, seed: 7, tensorboard: false}\n")
    return build_run_config(str(preset), list(overrides),
                            {"out_dir": ("--out-dir", str(tmp_path / "runs")), "name": ("--name", name)})


def test_a_short_training_run_works_and_resumes_exactly(tmp_path):
    from lmkit.training.loop import Trainer
    from lmkit.training.resume import resume_config

    source = shared("europarl-en", "ep-00-01-17.al").read_text(encoding="latin-1")
    text = tmp_path / "europarl.txt"
    text.write_text(source[:6000])  # 6,000 byte tokens: a few hundred per split and step
    straight = Trainer(_train_config(tmp_path, text, "straight"))
    summary = straight.run()
    assert summary["status"] == "completed" and summary["model_type"] == "backpack"
    assert summary["flops_per_token"] == straight.model.flops_per_token()
    assert summary["final_val_loss"] < math.log(257)  # below the uniform byte distribution's after 8 steps
    first = Trainer(_train_config(tmp_path, text, "halves", "training.max_steps=4"))
    first.run()
    config, changes = resume_config(first.run.path / "config.yaml", ["training.max_steps=8"])
    second = Trainer(config, lambda e: None, resume_dir=first.run.path, config_changes=changes)
    second.run()
    a, b = straight.model.state_dict(), second.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_compiled_training_step_equals_eager():
    torch.manual_seed(0)
    model = build_model(bp_cfg(n_layer=1)).train()
    idx = ids()
    _, eager = model(idx, idx)
    _, compiled = torch.compile(model)(idx, idx)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
def test_fp16_training_step_and_cached_generation_on_cuda():
    torch.manual_seed(0)
    for make in (bp_cfg, legacy_cfg):
        model = build_model(make(dropout=0.1), device="cuda").train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cuda")
        idx = ids().cuda()
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.float16):
                _, loss = model(idx, idx)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        assert math.isfinite(loss.item())
        model.eval()
        with torch.autocast("cuda", dtype=torch.float16):
            full, _ = model(idx[:, :10])
            cache = model.new_kv_cache(2, 10)
            steps = [model(idx[:, :5], kv_cache=cache)[0]] + [model(idx[:, t:t + 1], kv_cache=cache)[0]
                                                               for t in range(5, 10)]
        torch.testing.assert_close(torch.cat(steps, 1).float(), full.float(), atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------
# Memory: what a Backpack saves for backward beyond the GPT of the same shapes
# --------------------------------------------------------------------------------------


def backpack_extra_saved_bytes(B, T, d, k, r, precision):
    """On the CPU with dropout > 0 (a CPU dropout mask has its input's dtype): the sense network's
    activations, the senses (B·T·k·d) for α·C, q and k, α (B·k·T·T, fp32, plus its 16-bit cast
    under autocast), the causal mask, o, and under autocast the 16-bit copies of the sense and
    weight networks' weights. Written term by term, not from the code."""
    a = 4 if precision == "fp32" else 2
    N, stats = B * T, 2 * B * T * 4
    sense = (3 * (N * d * 4 + stats) + 2 * N * d * 4  # ln, ln_1, ln_2 inputs (fp32) + 2 fp32 dropout masks
             + 2 * (N * d * a + 2 * N * r * d * a)  # two MLPs: c_fc input, GELU input, c_proj input
             + N * d * a + N * k * d * a)  # dropout masks of the two MLP outputs
    mix = N * k * d * a + 2 * N * d * a + B * k * T * T * 4 + (B * k * T * T * a if a == 2 else 0) + T * T + N * d * a
    casts = (3 * r + r * k + 2) * d * d * a if a == 2 else 0
    return sense + mix + casts


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_saved_tensors_beyond_the_gpt_follow_the_formula(precision):
    from lmkit.analysis.memory_measure import measure_saved
    from lmkit.config import GPTConfig

    B, T, d, k, r = 2, 32, 64, 4, 2
    base = dict(n_layer=1, n_head=4, n_embd=d, block_size=T, vocab_size=300, dropout=0.1, bias=False)
    gpt = measure_saved(GPTConfig(**base), B, precision=precision)["saved_for_backward"]
    bp = measure_saved(BackpackConfig(**base, n_senses=k, sense_mlp_ratio=r), B, precision=precision)
    assert bp["saved_for_backward"] - gpt == backpack_extra_saved_bytes(B, T, d, k, r, precision)
