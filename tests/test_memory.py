"""The memory estimator: its formulas, seed 001's table, and its accuracy against measurement."""

from __future__ import annotations

import pytest
import torch

from lmkit.analysis.memory import (
    GB,
    GiB,
    MiB,
    count_params,
    estimate_memory,
    layer_activations,
    legacy_seed001,
    max_batch_size,
    parse_memory_size,
    resolve_vocab_size,
)
from lmkit.config import ModelConfig, available_presets, build_run_config
from lmkit.errors import ConfigError
from lmkit.models import build_model


def preset_model(name: str, overrides=()) -> ModelConfig:
    config = build_run_config(name, list(overrides))
    cfg = config.model.model_copy()
    cfg.vocab_size = resolve_vocab_size(config)
    return cfg


#: presets with an architecture of their own (a fine-tuning preset takes its --init-from run's)
OWN_ARCHITECTURE = sorted(n for n in available_presets() if build_run_config(n).init_from is None)


@pytest.mark.parametrize("name", OWN_ARCHITECTURE)
def test_analytic_param_count_equals_the_model(name):
    cfg = preset_model(name)
    model = build_model(cfg, device="meta")
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("batch", "total_gb"), [(8, 11.04), (16, 18.59), (32, 33.69)])
def test_legacy_seed001_table(batch, total_gb):
    cfg = preset_model("medium")  # GPT-2 small: P = 124,439,808
    P = count_params(cfg).total
    assert P == 124_439_808
    est = legacy_seed001(P, batch, 1024, 768, 12, 12)
    assert round(est.total_gb, 2) == total_gb
    # the seed printed AdamW as 0.99 GB: 8 × 124,439,808 B = 0.9955 GB, truncated rather than rounded
    assert (round(est.params_gb, 3), round(est.grads_gb, 3), round(est.adam_gb, 4)) == (0.498, 0.498, 0.9955)
    assert round(est.activations_gb, 2) == {8: 7.55, 16: 15.10, 32: 30.20}[batch]
    assert est.overhead_gb == 1.5


def test_layer_activations_follow_korthikanti_with_an_fp32_residual():
    # Korthikanti et al. 2022 eq. 1: 34·s·b·h bytes per layer with 16-bit activations, dropout and
    # fused attention. lmkit's residual stream (the two LayerNorm inputs) is fp32: +4 -> 38.
    cfg = ModelConfig(n_layer=1, n_head=8, n_embd=512, d_ff=2048, block_size=256, vocab_size=100, dropout=0.1)
    B, T, d, h = 4, 256, 512, 8
    terms = layer_activations(cfg, B, T, precision="bf16", attention="sdpa", device="cuda")
    small = 2 * 8 * B * T + terms["log-sum-exp"]  # LayerNorm mean/rstd, softmax log-sum-exp
    assert sum(terms.values()) - small == 38 * B * T * d
    assert terms["attention scores"] == 0
    eager = layer_activations(cfg, B, T, precision="bf16", attention="eager", device="cuda")
    # the math kernel computes 16-bit inputs in fp32: scores 4 + dropout mask 1 + dropout output 4 bytes
    assert eager["attention scores"] == 9 * h * T * T * B


def test_parse_memory_size():
    assert parse_memory_size("16GiB") == 16 * GiB
    assert parse_memory_size("24GB") == 24 * GB
    assert parse_memory_size("81920MiB") == 80 * GiB
    assert parse_memory_size("80") == 80 * GiB
    assert parse_memory_size("1.5 gib") == int(1.5 * GiB)
    for bad in ("sixteen", "16XB", "", "-1GiB", "0GB"):
        with pytest.raises(ConfigError):
            parse_memory_size(bad)


def test_switches_move_the_estimate_the_right_way():
    cfg = preset_model("small")
    base = estimate_memory(cfg, 16)
    assert estimate_memory(cfg, 16, precision="bf16").total < base.total
    assert estimate_memory(cfg, 16, grad_checkpointing=True).row("activations").size_bytes < \
        base.row("activations").size_bytes
    eager = estimate_memory(cfg, 16, attention="eager")
    assert eager.row("  of which attention scores").size_bytes == 6 * 16 * 8 * 512 * 512 * (4 + 1 + 4)
    assert eager.total > base.total
    assert estimate_memory(cfg, 32).total > base.total
    best = max_batch_size(cfg, 16 * GiB)
    assert estimate_memory(cfg, best).total <= 16 * GiB < estimate_memory(cfg, best + 1).total


def test_bad_shapes_are_config_errors():
    cfg = preset_model("small")
    with pytest.raises(ConfigError, match="block_size"):
        estimate_memory(cfg, 1, seq_len=4096)
    with pytest.raises(ConfigError, match="batch-size"):
        estimate_memory(cfg, 0)
    with pytest.raises(ConfigError, match="vocab_size"):
        resolve_vocab_size(build_run_config("tiny", ["data.tokenizer=char", "data.dataset=corpus.txt"]))


# --------------------------------------------------------------------------------------
# Accuracy against measurement (CPU: saved_tensors_hooks + parameter/gradient/AdamW bytes)
# --------------------------------------------------------------------------------------

CASES = [
    # seed 000's pilot as shipped: dropout 0.1, so the CPU runs SDPA's math kernel (eager)
    ("pilot", [], 32, 32, "fp32", "eager"),
    # seed 001's tiny (GPT-2 vocabulary, learned positions) without dropout: the fused CPU kernel, bf16 autocast
    ("tiny", ["model.dropout=0"], 4, 128, "bf16", "sdpa"),
]


@pytest.mark.parametrize(("preset", "overrides", "batch", "seq", "precision", "attention"), CASES)
def test_estimate_within_10_percent_of_measurement_on_cpu(preset, overrides, batch, seq, precision, attention):
    from lmkit.analysis.memory_measure import measure_saved

    torch.set_num_threads(1)
    cfg = preset_model(preset, overrides)
    measured = measure_saved(cfg, batch, seq, precision=precision)
    est = estimate_memory(cfg, batch, seq_len=seq, precision=precision, attention=attention, device="cpu")
    assert measured["saved_for_backward"] > 1 * MiB
    assert est.saved_for_backward == pytest.approx(measured["saved_for_backward"], rel=0.10)
    assert est.model_state + est.saved_for_backward == pytest.approx(measured["total"], rel=0.10)
    assert est.row("weights").size_bytes == measured["weights"]
    assert est.row("gradients").size_bytes == measured["gradients"]


@pytest.mark.parametrize(("preset", "overrides", "batch", "seq", "precision", "attention", "ckpt"), [
    ("pilot", [], 32, 32, "fp32", "eager", False),
    ("tiny", ["model.dropout=0"], 4, 128, "bf16", "sdpa", False),  # the 50,257-way logits dominate
    ("tiny", ["model.dropout=0"], 4, 128, "fp32", "sdpa", True),
])
def test_estimated_peak_within_10_percent_of_the_cpu_allocator_peak(preset, overrides, batch, seq, precision,
                                                                    attention, ckpt):
    # The profiler's allocation events give the CPU's max_memory_allocated. The model keeps no logits
    # when given targets (issue 9, item 9): a step that still held the fp32 B·T·V logits would peak
    # 98 MiB (20%) above this estimate in the tiny fp32 case.
    from lmkit.analysis.memory_measure import measure_cpu_peak

    torch.set_num_threads(1)
    cfg = preset_model(preset, overrides)
    measured = measure_cpu_peak(cfg, batch, seq, precision=precision, attention=attention, grad_checkpointing=ckpt)
    est = estimate_memory(cfg, batch, seq_len=seq, precision=precision, attention=attention, device="cpu",
                          grad_checkpointing=ckpt)
    assert est.peak_allocated == pytest.approx(measured["peak_allocated"], rel=0.10)


@pytest.mark.gpu
@pytest.mark.parametrize(("preset", "batch", "precision", "ckpt"),
                         [("small", 8, "fp32", False), ("small", 8, "bf16", False), ("medium", 4, "bf16", True)])
def test_estimated_peak_within_10_percent_of_max_memory_allocated(preset, batch, precision, ckpt):
    from lmkit.analysis.memory_measure import measure_cuda_peak

    cfg = preset_model(preset)
    measured = measure_cuda_peak(cfg, batch, precision=precision, grad_checkpointing=ckpt)
    est = estimate_memory(cfg, batch, precision=precision, grad_checkpointing=ckpt, device="cuda")
    assert not measured["oom"]
    assert est.peak_allocated == pytest.approx(measured["max_allocated"], rel=0.10)
