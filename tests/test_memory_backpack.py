"""The memory estimator for the Backpack families (lmkit/analysis/memory_backpack.py): parameter
counts against the built models, saved-for-backward bytes against saved_tensors_hooks on the CPU,
peaks against the CPU allocator, and `lmkit doctor`'s rows."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from lmkit.analysis.memory import GB, MiB, count_params, estimate_memory
from lmkit.cli import app
from lmkit.config.backpack import BackpackConfig, BackpackLegacyConfig
from lmkit.models import build_model

BASE = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=200, bias=False)


def bp_cfg(**kw):
    return BackpackConfig(**{**BASE, "n_senses": 8, "sense_mlp_ratio": 3, **kw})


def legacy_cfg(**kw):
    return BackpackLegacyConfig(**{**BASE, "n_senses": 8, **kw})


@pytest.mark.parametrize("cfg", [
    bp_cfg(), bp_cfg(bias=True), bp_cfg(norm="rmsnorm", embed_norm=True, pos_encoding="rope", qkv="separate"),
    bp_cfg(norm="rmsnorm", norm_affine=False), legacy_cfg(), legacy_cfg(bias=True, n_senses=3),
], ids=["bp", "bp-bias", "bp-rms-rope", "bp-no-gain", "legacy", "legacy-bias"])
def test_param_count_equals_the_built_model(cfg):
    model = build_model(cfg, device="meta")
    pc = count_params(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    assert pc.token_table == model.input_embedding().weight.numel()
    # Muon takes every 2-D parameter but the embeddings and an untied head (training/optim.py)
    from lmkit.config import TrainConfig
    from lmkit.training.optim import muon_param_groups

    muon, _ = muon_param_groups(model, TrainConfig(max_steps=1))
    est = estimate_memory(cfg, 2, device="cpu", optimizer="muon")
    assert est.row("optimizer state").size_bytes == 8 * pc.total - 4 * sum(p.numel() for p in muon)


# --------------------------------------------------------------------------------------
# Saved for backward: exact against saved_tensors_hooks (CPU)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [bp_cfg, legacy_cfg], ids=["backpack", "legacy"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["full", "ckpt"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_saved_bytes_equal_the_measurement(make, precision, ckpt, dropout):
    from lmkit.analysis.memory_measure import measure_saved

    torch.set_num_threads(1)
    cfg = make(dropout=dropout)
    B = 3
    measured = measure_saved(cfg, B, precision=precision, grad_checkpointing=ckpt)
    # with dropout the CPU runs SDPA's math kernel (what `eager` describes)
    est = estimate_memory(cfg, B, precision=precision, attention="eager" if dropout else "sdpa", device="cpu",
                          grad_checkpointing=ckpt)
    assert est.saved_for_backward == measured["saved_for_backward"]
    assert est.row("weights").size_bytes == measured["weights"]
    assert est.row("gradients").size_bytes == measured["gradients"]
    # AdamW's exp_avg + exp_avg_sq (+ one 4-byte step counter per tensor)
    assert 0 <= measured["optimizer_state"] - est.row("optimizer state").size_bytes < 4 * 100


@pytest.mark.parametrize("options", [dict(norm="rmsnorm"), dict(norm="rmsnorm", norm_affine=False), dict(bias=True),
                                     dict(activation="relu2"), dict(pos_encoding="rope", qk_norm=True)],
                         ids=["rmsnorm", "no-gain", "bias", "relu2", "rope-qknorm"])
@pytest.mark.parametrize(("precision", "ckpt"), [("bf16", False), ("fp32", True)])
def test_saved_bytes_equal_the_measurement_with_the_gpt_options(options, precision, ckpt):
    # the sense network's norms and MLPs follow the config's norm, gain, bias and activation
    from lmkit.analysis.memory_measure import measure_saved

    torch.set_num_threads(1)
    cfg = bp_cfg(dropout=0.1, **options)
    measured = measure_saved(cfg, 3, precision=precision, grad_checkpointing=ckpt)
    est = estimate_memory(cfg, 3, precision=precision, attention="eager", device="cpu", grad_checkpointing=ckpt)
    assert est.saved_for_backward == measured["saved_for_backward"]


def test_the_sense_rows_follow_the_documented_formulas_at_the_europarl_preset():
    # backpack-europarl: B 32, T 512, d 384, k 16, r 4, fp16 on CUDA (1-byte dropout masks)
    cfg = bp_cfg(n_layer=6, n_head=6, n_embd=384, block_size=512, vocab_size=250_002, n_senses=16,
                 sense_mlp_ratio=4, dropout=0.1)
    est = estimate_memory(cfg, 32, precision="fp16", device="cuda")
    B, T, d, k = 32, 512, 384, 16
    assert est.row("α B·k·T²").size_bytes == 6 * B * k * T * T == 768 * MiB  # fp32 0.5 GiB + a 0.25 GiB cast
    assert est.row("senses B·T·k·d").size_bytes == 2 * B * T * k * d
    extra = sum(est.row(n).size_bytes for n in ("sense network", "senses B·T·k·d", "α B·k·T²",
                                                 "q, k, o, causal mask", "sense weight copies"))
    assert 1.35 * 2**30 < extra < 1.45 * 2**30
    gpt = estimate_memory(cfg.model_copy(update={"type": "gpt"}), 32, precision="fp16", device="cuda")
    assert est.saved_for_backward - gpt.saved_for_backward == extra


# --------------------------------------------------------------------------------------
# Peaks: within 10% of the CPU allocator's, with the peak in a Backpack stage
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "precision", "ckpt", "phase"), [
    (bp_cfg, "fp32", False, "sense mixture backward"),
    (bp_cfg, "bf16", True, "sense mixture backward"),
    (legacy_cfg, "bf16", False, "forward end (cross-entropy)"),
])
def test_peak_within_10_percent_of_the_cpu_allocator_peak(make, precision, ckpt, phase):
    from lmkit.analysis.memory_measure import measure_cpu_peak

    torch.set_num_threads(1)
    # long context and many senses so that α (B·k·T²) and the senses (B·T·k·d) dominate
    cfg = make(n_embd=64, block_size=128, vocab_size=64, n_senses=16, dropout=0.0)
    measured = measure_cpu_peak(cfg, 4, precision=precision, grad_checkpointing=ckpt)
    est = estimate_memory(cfg, 4, precision=precision, device="cpu", grad_checkpointing=ckpt)
    assert est.peak_phase == phase
    state = est.row("weights").size_bytes + est.row("optimizer state").size_bytes
    assert est.peak_allocated - state == pytest.approx(measured["peak_allocated"] - state, rel=0.10)


def test_legacy_embedding_backward_uses_the_wide_table():
    cfg = legacy_cfg(vocab_size=250_002, n_embd=384, n_head=6, n_layer=6, block_size=512, n_senses=16)
    est = estimate_memory(cfg, 1, seq_len=16, precision="fp16")
    assert est.peak_phase == "embedding backward"
    assert est.row("backward temporaries").size_bytes > 4 * 250_002 * 384 * 16 > 6.1 * GB


# --------------------------------------------------------------------------------------
# lmkit doctor
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("preset", "rows", "params"), [
    ("backpack-europarl", ["sense network", "senses B·T·k·d", "α B·k·T²", "q, k, o, causal mask",
                           "sense weight copies"], "118,321,920"),
    ("backpack-europarl-legacy", ["sense vectors B·T·k·d", "sense weights"], "1,642,985,488"),
])
def test_doctor_shows_the_sense_rows(preset, rows, params):
    result = CliRunner().invoke(app, ["doctor", "--preset", preset], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    assert f"Total parameters: {params}" in result.output
    assert "Difference from" not in result.output  # the target is the preset's own documented count (issue 16)
    for row in rows:
        assert f"│ {row} " in result.output, row


# --------------------------------------------------------------------------------------
# CUDA (not run on the CPU machines this was written on: the CUDA-only terms -- 1-byte dropout
# masks, the legacy sense weights' fp32 softmax -- are checked here first)
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("make", [bp_cfg, legacy_cfg], ids=["backpack", "legacy"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_cuda_fp16_saved_bytes_beyond_the_same_shape_gpt(make, dropout):
    from lmkit.analysis.memory_measure import measure_saved
    from lmkit.config import GPTConfig

    cfg = make(dropout=dropout, n_embd=64, block_size=64)
    gpt = GPTConfig(**{**BASE, "n_embd": 64, "block_size": 64, "dropout": dropout,
                       "tie_embeddings": cfg.tie_embeddings})
    measured = {c.type: measure_saved(c, 4, precision="fp16", device="cuda")["saved_for_backward"] for c in (cfg, gpt)}
    est = {c.type: estimate_memory(c, 4, precision="fp16", device="cuda").saved_for_backward for c in (cfg, gpt)}
    assert est[cfg.type] - est["gpt"] == measured[cfg.type] - measured["gpt"]


@pytest.mark.gpu
@pytest.mark.parametrize(("make", "ckpt"), [(bp_cfg, False), (bp_cfg, True), (legacy_cfg, False)])
def test_cuda_peak_within_10_percent_of_max_memory_allocated(make, ckpt):
    from lmkit.analysis.memory_measure import measure_cuda_peak

    cfg = make(n_layer=4, n_head=8, n_embd=256, block_size=256, vocab_size=2048, n_senses=16, dropout=0.1)
    measured = measure_cuda_peak(cfg, 8, precision="fp16", grad_checkpointing=ckpt)
    est = estimate_memory(cfg, 8, precision="fp16", grad_checkpointing=ckpt, device="cuda")
    assert not measured["oom"]
    assert est.peak_allocated == pytest.approx(measured["max_allocated"], rel=0.10)
