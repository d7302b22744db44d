"""nanochat's GPT as options of the GPT family (issue 10): the forward against a transcription of
nanochat's ``nanochat/gpt.py`` (November 2025), KV cache, capture, checkpointing, FLOPs, the
``nanochat-d4`` preset, ``doctor``, the memory estimator against measurement, and export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmkit.config import GPTConfig, build_run_config
from lmkit.errors import ConfigError
from lmkit.models import build_model

from conftest import run_cli

FINFO_EPS = torch.finfo(torch.float32).eps  # what F.rms_norm(x, shape) uses on fp32 when eps is None

NANO = dict(pos_encoding="rope", norm="rmsnorm", norm_affine=False, layer_norm_eps=FINFO_EPS, embed_norm=True,
            qk_norm=True, activation="relu2", qkv="separate", bias=False, tie_embeddings=False, logit_softcap=15.0,
            init="nanochat", dropout=0.0)


def nano_cfg(**kw) -> GPTConfig:
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97), **NANO, **kw})


def randomised(cfg: GPTConfig, seed: int = 0):
    """The model with every weight drawn at random (nanochat's init zeroes c_proj and lm_head, which
    would make every comparison trivially equal)."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


# ---- a transcription of nanochat/gpt.py (karpathy/nanochat, Nov 2025: norm, apply_rotary_emb,
# CausalSelfAttention / MLP / Block / GPT.forward, training path), rotary tables kept in fp32 --------

def _nc_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def _nc_apply_rotary_emb(x, cos, sin):
    assert x.ndim == 4
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3)


def nanochat_forward(w: dict, n_layer: int, n_head: int, idx: torch.Tensor, targets=None):
    B, T = idx.shape
    C = w["wte"].shape[1]
    D = C // n_head
    channel_range = torch.arange(0, D, 2, dtype=torch.float32)
    inv_freq = 1.0 / (10000 ** (channel_range / D))
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
    x = _nc_norm(F.embedding(idx, w["wte"]))
    for i in range(n_layer):
        h = _nc_norm(x)
        q = F.linear(h, w[f"{i}.c_q"]).view(B, T, n_head, D)
        k = F.linear(h, w[f"{i}.c_k"]).view(B, T, n_head, D)
        v = F.linear(h, w[f"{i}.c_v"]).view(B, T, n_head, D)
        q, k = _nc_apply_rotary_emb(q, cos, sin), _nc_apply_rotary_emb(k, cos, sin)
        q, k = _nc_norm(q), _nc_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + F.linear(y.transpose(1, 2).contiguous().view(B, T, -1), w[f"{i}.attn_proj"])
        h = F.linear(_nc_norm(x), w[f"{i}.c_fc"])
        x = x + F.linear(F.relu(h).square(), w[f"{i}.mlp_proj"])
    x = _nc_norm(x)
    softcap = 15
    logits = F.linear(x, w["lm_head"])
    logits = softcap * torch.tanh(logits / softcap)
    if targets is None:
        return logits
    logits = logits.float()
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def nanochat_weights(model, n_head: int) -> dict:
    """lmkit's weights in nanochat's layout. nanochat rotates by -theta, lmkit by +theta: negating
    the second half of each head's rows of c_q and c_k maps one onto the other (the module
    docstring of lmkit.models.gpt)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def flip(weight):
        C = weight.shape[1]
        w = weight.view(n_head, C // n_head, C).clone()
        w[:, C // n_head // 2:, :] *= -1
        return w.view(-1, C)

    out = {"wte": sd["transformer.wte.weight"], "lm_head": sd["lm_head.weight"]}
    for i in range(model.config.n_layer):
        p = f"transformer.h.{i}."
        out[f"{i}.c_q"] = flip(sd[p + "attn.c_q.weight"])
        out[f"{i}.c_k"] = flip(sd[p + "attn.c_k.weight"])
        out[f"{i}.c_v"] = sd[p + "attn.c_v.weight"]
        out[f"{i}.attn_proj"] = sd[p + "attn.c_proj.weight"]
        out[f"{i}.c_fc"] = sd[p + "mlp.c_fc.weight"]
        out[f"{i}.mlp_proj"] = sd[p + "mlp.c_proj.weight"]
    return out


def test_forward_and_loss_equal_nanochats():
    cfg = nano_cfg()
    model = randomised(cfg)
    assert not any(True for _ in model.transformer.ln_f.parameters())  # parameter-free norms
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(0, cfg.vocab_size, (3, cfg.block_size), generator=torch.Generator().manual_seed(2))
    w = nanochat_weights(model, cfg.n_head)
    with torch.no_grad():
        ours, _ = model(idx)
        _, loss = model(idx, tgt)
        theirs = nanochat_forward(w, cfg.n_layer, cfg.n_head, idx)
        their_loss = nanochat_forward(w, cfg.n_layer, cfg.n_head, idx, tgt)
    assert ours.abs().max() < 15.0 and ours.abs().max() > 5.0  # the soft-cap is active
    assert (ours - theirs).abs().max() < 1e-5
    assert abs(float(loss) - float(their_loss)) < 1e-5
    # without the sign flip the outputs differ: the comparison sees the rotary convention
    plain = {k: v for k, v in w.items()}
    plain.update({f"{i}.c_q": model.state_dict()[f"transformer.h.{i}.attn.c_q.weight"] for i in range(2)})
    with torch.no_grad():
        assert (nanochat_forward(plain, cfg.n_layer, cfg.n_head, idx) - ours).abs().max() > 1e-3


def test_each_option_changes_the_function_and_defaults_keep_gpt2():
    base = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=31, pos_encoding="rope", dropout=0.0)
    idx = torch.randint(0, 31, (2, 8), generator=torch.Generator().manual_seed(0))

    def logits(**kw):
        with torch.no_grad():
            return randomised(GPTConfig(**base, **kw))(idx)[0]

    ref = logits()
    assert torch.equal(ref, logits(norm="layernorm", norm_affine=True, qk_norm=False, embed_norm=False,
                                   qkv="fused", logit_softcap=None, init="gpt2"))
    for kw in ({"norm": "rmsnorm"}, {"qk_norm": True}, {"embed_norm": True}, {"activation": "relu2"},
               {"logit_softcap": 2.0}):
        assert (logits(**kw) - ref).abs().max() > 1e-4, kw
    capped = logits(logit_softcap=2.0)
    assert capped.abs().max() < 2.0


def test_norms_without_weights_and_separate_projections():
    model = build_model(nano_cfg(), device="meta")
    names = [n for n, _ in model.named_parameters()]
    assert not any("ln_" in n for n in names)
    assert "transformer.h.0.attn.c_q.weight" in names and not any("c_attn" in n for n in names)
    assert list(model.target_modules("attention")) == [
        f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_q", "c_k", "c_v", "c_proj")]
    affine = build_model(nano_cfg(norm_affine=True), device="meta")
    assert sum(p.numel() for n, p in affine.named_parameters() if "ln_" in n) == (2 * 2 + 2) * 32  # RMSNorm gains


def test_init_nanochat():
    torch.manual_seed(0)
    cfg = nano_cfg(n_embd=64, d_ff=256)
    model = build_model(cfg)
    assert torch.count_nonzero(model.lm_head.weight) == 0
    assert all(torch.count_nonzero(b.attn.c_proj.weight) == 0 and torch.count_nonzero(b.mlp.c_proj.weight) == 0
               for b in model.transformer.h)
    assert model.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.transformer.h[0].attn.c_q.weight.std().item() == pytest.approx(64 ** -0.5, rel=0.05)
    # c_fc is 256 x 64: std 1/sqrt(fan_in) * min(1, sqrt(fan_out / fan_in)) = 1/8
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(1 / 8, rel=0.05)


def test_kv_cache_generation_equals_the_full_forward():
    cfg = nano_cfg()
    model = randomised(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(2, cfg.block_size)
        parts = [model(idx[:, :5], kv_cache=cache)[0]]
        for t in range(5, cfg.block_size):
            parts.append(model(idx[:, t:t + 1], kv_cache=cache)[0])
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5


def test_capture_and_grad_checkpointing():
    cfg = nano_cfg()
    model = randomised(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, _ = model(idx)
        with model.capture(heads=True, attn_probs=True) as cap:
            captured, _ = model(idx)
    assert (captured - full).abs().max() < 1e-5  # the math path sees the same normalised q and k
    assert cap.heads[0].shape == (2, cfg.n_head, cfg.block_size, cfg.head_dim)
    assert torch.allclose(cap.attn_probs[1].sum(-1), torch.ones(2, cfg.n_head, cfg.block_size), atol=1e-5)

    model.train()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        model(idx, idx)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_flops_per_token_matches_flop_counter():
    from test_flops import counted_flops_per_token

    cfg = nano_cfg(d_ff=64, vocab_size=500)
    model = build_model(cfg, device="meta")
    assert model.flops_per_token() == pytest.approx(counted_flops_per_token(cfg), rel=0.02)
    assert model.flops_per_token(8) == pytest.approx(counted_flops_per_token(cfg, seq_len=8), rel=0.02)


def test_bad_option_values_are_one_line_config_errors():
    for key, value in (("norm", "batchnorm"), ("qkv", "split"), ("activation", "swish"), ("logit_softcap", 0),
                       ("init", "xavier")):
        with pytest.raises(ConfigError) as err:
            build_run_config("nanochat-d4", [f"model.{key}={value}"])
        assert "\n" not in str(err.value) and f"model.{key}" in str(err.value)


# ---- the preset ---------------------------------------------------------------------------------

def test_preset_is_nanochats_d4():
    config = build_run_config("nanochat-d4")
    m, t = config.model, config.training
    assert (m.n_layer, m.n_embd, m.n_head, m.vocab_size, m.block_size, m.ff_dim) == (4, 256, 2, 65536, 512, 1024)
    assert (m.norm, m.norm_affine, m.qk_norm, m.embed_norm, m.activation, m.qkv) == (
        "rmsnorm", False, True, True, "relu2", "separate")
    assert (m.bias, m.tie_embeddings, m.logit_softcap, m.pos_encoding, m.layer_norm_eps) == (
        False, False, 15.0, "rope", FINFO_EPS)
    assert (t.optimizer, t.lr, t.embedding_lr, t.head_lr, t.muon_weight_decay, t.weight_decay) == (
        "muon", 0.02, 0.2, 0.004, 0.0, 0.0)
    assert (t.schedule, t.warmup_steps, t.warmdown_ratio, t.min_lr_ratio, t.betas, t.eps) == (
        "warmdown", 0, 0.2, 0.0, (0.8, 0.95), 1e-10)
    model = build_model(m, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 36_700_160
    # the data option the example uses: local text, lmkit's BPE
    local = build_run_config("nanochat-d4", ["data.dataset=../shared/data/wikitext-2-raw/wiki.valid.raw"])
    assert local.data.tokenizer == "bpe" and local.model.vocab_size == 65536


def test_doctor_reports_the_preset():
    from typer.testing import CliRunner

    from lmkit.cli import app

    result = CliRunner().invoke(app, ["doctor", "--json", "--preset", "nanochat-d4"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["params"]["total"] == 36_700_160 == report["params"]["trainable"]
    assert report["params"]["head"] == 65536 * 256 and report["params"]["non_embedding"] == 3_145_728
    assert report["memory"]["peak_allocated"] > report["memory"]["model_state"]


# ---- the memory estimator against measurement (CPU) ----------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_memory_estimate_matches_saved_tensors(precision):
    from lmkit.analysis.memory import estimate_memory
    from lmkit.analysis.memory_measure import measure_cpu_peak, measure_saved

    torch.set_num_threads(1)
    cfg = nano_cfg(n_embd=64, block_size=64, vocab_size=2048)
    measured = measure_saved(cfg, 4, 64, precision=precision)
    est = estimate_memory(cfg, 4, seq_len=64, precision=precision, device="cpu")
    assert measured["saved_for_backward"] > 1 * 2**20
    # the tolerance of tests/test_memory.py is 10%; the options' terms were measured, so 2% holds
    assert est.saved_for_backward == pytest.approx(measured["saved_for_backward"], rel=0.02)
    assert est.row("weights").size_bytes == measured["weights"]
    peak = measure_cpu_peak(cfg, 4, 64, precision=precision)
    assert est.peak_allocated == pytest.approx(peak["peak_allocated"], rel=0.05)


def test_memory_estimate_of_the_muon_state():
    from lmkit.analysis.memory import estimate_memory
    from lmkit.analysis.memory_measure import _optimizer_bytes
    from lmkit.config import TrainConfig
    from lmkit.training.optim import build_optimizer

    cfg = nano_cfg()
    model = randomised(cfg).train()
    opt = build_optimizer(model, TrainConfig(max_steps=1, optimizer="muon"), torch.device("cpu"))
    model(torch.randint(0, cfg.vocab_size, (2, 16)), torch.randint(0, cfg.vocab_size, (2, 16)))[1].backward()
    opt.step()
    est = estimate_memory(cfg, 2, device="cpu", optimizer="muon")
    # AdamW's scalar ``step`` tensors (4 B per AdamW parameter tensor) are the difference
    assert est.row("optimizer state").size_bytes == pytest.approx(_optimizer_bytes(opt), abs=4 * 4)
    assert est.row("optimizer state").size_bytes < estimate_memory(cfg, 2, device="cpu").row("optimizer state").size_bytes


# ---- export ---------------------------------------------------------------------------------------

NANO_PRESET = """\
model: {n_layer: 2, n_head: 2, n_embd: 32, d_ff: 128, block_size: 32, pos_encoding: rope, norm: rmsnorm,
        norm_affine: false, layer_norm_eps: 1.1920928955078125e-07, embed_norm: true, qk_norm: true,
        activation: relu2, qkv: separate, bias: false, tie_embeddings: false, logit_softcap: 15.0, init: nanochat,
        dropout: 0.0}
data:
  dataset: arithmetic
  tokenizer: char
  arithmetic: {n_train: 256, n_val: 32, n_test_flat: 8, n_test_paren: 8}
training: {batch_size: 16, max_steps: 6, optimizer: muon, lr: 0.02, betas: [0.8, 0.95], eps: 1.0e-10,
           weight_decay: 0.0, schedule: warmdown, warmup_steps: 0, min_lr_ratio: 0.0, log_interval: 2,
           eval_interval: 6, eval_iters: 2, checkpoint_interval: 6, seed: 2}
"""


def test_hf_export_refuses_nanochat_options_and_safetensors_works(tmp_path):
    pytest.importorskip("transformers")
    from lmkit.export import hf
    from lmkit.export.safetensors_export import load_safetensors_export
    from lmkit.runs import load_run
    from lmkit.training.loop import train

    with pytest.raises(ConfigError, match=r"qk_norm=true") as err:
        hf.hf_architecture(build_run_config("nanochat-d4").model)
    for option in ("norm=rmsnorm", "norm_affine=false", "embed_norm=true", "activation=relu2", "qkv=separate",
                   "logit_softcap=15"):
        assert option in str(err.value)
    for key, value, named in (("norm", "rmsnorm", "norm=rmsnorm"), ("qkv", "separate", "qkv=separate"),
                              ("logit_softcap", 30.0, "logit_softcap=30")):
        with pytest.raises(ConfigError, match=named):
            hf.hf_architecture(GPTConfig(**{key: value}))
    assert hf.hf_architecture(GPTConfig(pos_encoding="rope")) == "gpt_neox"

    preset = tmp_path / "nano.yaml"
    preset.write_text(NANO_PRESET)
    train(build_run_config(str(preset), [], {"out_dir": ("--out-dir", str(tmp_path / "runs")),
                                             "name": ("--name", "nano")}))
    run = tmp_path / "runs" / "nano"
    refused = run_cli("export", str(run), str(tmp_path / "hf"), "--to", "hf", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr.strip()
    assert "\n" not in line and "qk_norm=true" in line and "--to safetensors" in line
    assert not (tmp_path / "hf").exists()
    done = run_cli("export", str(run), str(tmp_path / "st"), "--to", "safetensors", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    exported, _ = load_safetensors_export(tmp_path / "st")
    loaded = load_run(run)
    idx = torch.randint(0, loaded.config.model.vocab_size, (2, 32))
    with torch.no_grad():
        assert torch.equal(exported(idx)[0], loaded.model(idx)[0])
