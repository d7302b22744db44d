"""The model interface (lmkit.models.base.LanguageModel) as GPT implements it: no logits kept with
targets, per-head outputs and attention probabilities, head edits, target modules, flexible
checkpoint loading, and no code outside lmkit/models reaching into a family's modules."""

from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from lmkit.config import ModelConfig
from lmkit.errors import CheckpointError
from lmkit.models import base as model_base
from lmkit.models import build_model
from lmkit.models.base import TARGET_KINDS, LanguageModel


def cfg(**kw):
    base = dict(n_layer=2, n_head=2, n_embd=32, d_ff=48, block_size=16, vocab_size=50, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def test_gpt_is_a_language_model():
    model = build_model(cfg(), device="meta")
    assert isinstance(model, LanguageModel)
    cache = model.new_kv_cache(3, 10)
    assert (cache.n_layer, cache.max_len, cache.length) == (2, 10, 0)
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing is True


# --------------------------------------------------------------------------------------
# Item 9: with targets the logits are neither returned nor kept alive until backward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_logits_are_freed_before_backward_when_targets_are_given(precision):
    torch.manual_seed(0)
    model = build_model(cfg()).train()
    alive: list[weakref.ref] = []
    model.output_head().register_forward_hook(lambda mod, inp, out: alive.append(weakref.ref(out)))
    idx = torch.randint(0, 50, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(idx, idx)
    gc.collect()
    assert out[0] is None
    assert alive and alive[0]() is None  # nothing (caller, graph, model) holds the (B, T, V) logits
    # what backward keeps of the head is the log-softmax output (B*T, V) in fp32, not the logits
    out[1].backward()


def test_loss_equals_cross_entropy_of_the_logits_without_targets():
    torch.manual_seed(0)
    model = build_model(cfg()).eval()
    idx = torch.randint(0, 50, (2, 16))
    targets = torch.randint(0, 50, (2, 16))
    targets[0, :3] = -100
    logits, _ = model(idx)
    _, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)


# --------------------------------------------------------------------------------------
# Per-head outputs and attention probabilities
# --------------------------------------------------------------------------------------


def _values(model, idx):
    """Each layer's v (B, H, T, D), read from c_attn's output with a hook (independent of the
    attention code)."""
    out = {}
    hooks = []
    for name, mod in model.target_modules("attention").items():
        if name.endswith("c_attn"):
            layer = int(name.split(".")[2])
            hooks.append(mod.register_forward_hook(lambda m, i, o, layer=layer: out.__setitem__(layer, o)))
    model(idx)
    for h in hooks:
        h.remove()
    B, T = idx.shape
    H, D = model.config.n_head, model.config.head_dim
    return {k: o.split(model.config.n_embd, dim=2)[2].view(B, T, H, D).transpose(1, 2) for k, o in out.items()}


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_attention_probabilities_reproduce_the_sdpa_output(pos):
    torch.manual_seed(0)
    model = build_model(cfg(pos_encoding=pos)).eval()
    idx = torch.randint(0, 50, (3, 12))
    plain, _ = model(idx)
    with torch.no_grad():
        with model.capture(heads=True) as fused:  # heads only: the fused SDPA kernel still runs
            model(idx)
        with model.capture(heads=True, attn_probs=True) as exact:
            logits, _ = model(idx)
    torch.testing.assert_close(logits, plain.detach())  # the math path computes the same model
    values = _values(model, idx)
    for layer in range(2):
        probs, heads = exact.attn_probs[layer], fused.heads[layer]
        assert probs.shape == (3, 2, 12, 12) and heads.shape == (3, 2, 12, 16)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, 12))
        assert torch.all(probs.triu(1) == 0)  # causal: no weight on later tokens
        torch.testing.assert_close(probs @ values[layer], heads, rtol=1e-5, atol=1e-6)  # = SDPA's output
        torch.testing.assert_close(exact.heads[layer], heads, rtol=1e-5, atol=1e-6)
    # outside the block nothing is recorded and the fused kernel runs again
    assert all(m.capture is None for m in model.modules() if hasattr(m, "capture") and not callable(m.capture))


def test_probabilities_with_a_cache_and_a_padding_mask():
    torch.manual_seed(0)
    model = build_model(cfg()).eval()
    ids = torch.randint(0, 50, (1, 6))
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], dim=1)  # two left-padding columns
    pos = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5]])
    key_ok = torch.tensor([[False, False] + [True] * 6])
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    mask = (causal[None] & (key_ok[:, None, :] | torch.eye(8, dtype=torch.bool)[None]))[:, None]
    with torch.no_grad(), model.capture(attn_probs=True) as cap:
        cache = model.new_kv_cache(1, 9)
        model(padded, position_ids=pos, attn_mask=mask, kv_cache=cache)
        prefill = cap.attn_probs[0].clone()
        step_mask = torch.cat([key_ok, torch.ones(1, 1, dtype=torch.bool)], dim=1)[:, None, None, :]
        model(ids[:, -1:], position_ids=torch.tensor([[6]]), attn_mask=step_mask, kv_cache=cache)
        step = cap.attn_probs[0]
    assert prefill.shape == (1, 2, 8, 8) and step.shape == (1, 2, 1, 9)
    assert torch.all(prefill[..., 2:, :2] == 0) and torch.all(step[..., :2] == 0)  # padding gets no weight
    with torch.no_grad(), model.capture(attn_probs=True) as alone:
        model(torch.cat([ids, ids[:, -1:]], dim=1))
    # the padded, cached row attends exactly as the row alone
    torch.testing.assert_close(prefill[..., 2:, 2:], alone.attn_probs[0][..., :6, :6], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(step[..., 2:], alone.attn_probs[0][..., 6:, :], rtol=1e-4, atol=1e-6)


def test_editing_a_head_equals_zeroing_its_slice_of_the_output_projection():
    torch.manual_seed(0)
    model = build_model(cfg()).eval()
    idx = torch.randint(0, 50, (2, 10))

    def drop_head_1_of_layer_0(layer, y):
        if layer == 0:
            y = y.clone()
            y[:, 1] = 0
        return y

    with torch.no_grad():
        with model.capture(edit_heads=drop_head_1_of_layer_0):
            ablated, _ = model(idx)
        reference = build_model(cfg()).eval()
        reference.load_state_dict(model.state_dict())
        proj = reference.target_modules("attention")["transformer.h.0.attn.c_proj"]
        proj.weight[:, 16:32] = 0  # head 1's input columns (head_dim 16)
        expected, _ = reference(idx)
        plain, _ = model(idx)
    torch.testing.assert_close(ablated, expected)
    assert not torch.allclose(ablated, plain)


# --------------------------------------------------------------------------------------
# Target modules, swapping, flexible loading
# --------------------------------------------------------------------------------------


def test_target_modules_name_real_linears():
    model = build_model(cfg(n_layer=3), device="meta")
    sizes = {kind: len(model.target_modules(kind)) for kind in TARGET_KINDS}
    assert sizes == {"attention": 6, "mlp": 6, "blocks": 12, "head": 1, "all": 13}
    for name, module in model.target_modules("all").items():
        assert isinstance(module, nn.Linear) and model.get_submodule(name) is module
    assert model.target_modules("head")["lm_head"] is model.output_head()
    with pytest.raises(ValueError, match="unknown target module kind 'conv'"):
        model.target_modules("conv")


class LowRank(nn.Module):
    """A rank-r stand-in for an adaptive-SVD layer: y = x v^T u^T + b."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        U, S, Vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
        self.u = nn.Parameter(U[:, :rank] * S[:rank])
        self.v = nn.Parameter(Vh[:rank].clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return x @ self.v.T @ self.u.T + self.bias

    def matmul_params(self):
        return self.u.numel() + self.v.numel()


def restore_low_rank(model, state):
    for name, module in model.target_modules("blocks").items():
        if f"{name}.u" in state and not isinstance(module, LowRank):
            model.swap_module(name, LowRank(module, state[f"{name}.u"].shape[1]))


def test_a_checkpoint_with_a_swapped_layer_loads_through_the_adapter(monkeypatch):
    monkeypatch.setattr(model_base, "LOAD_ADAPTERS", [])
    torch.manual_seed(0)
    trained = build_model(cfg())
    old = trained.swap_module("transformer.h.1.mlp.c_fc", LowRank(trained.target_modules("mlp")
                                                                   ["transformer.h.1.mlp.c_fc"], 4))
    assert isinstance(old, nn.Linear)
    assert isinstance(trained.target_modules("mlp")["transformer.h.1.mlp.c_fc"], LowRank)
    # the FLOP count follows the swap: 48*32 weights became (48 + 32) * 4 factors
    assert build_model(cfg()).flops_per_token() - trained.flops_per_token() == 6 * (48 * 32 - 80 * 4)
    state = trained.state_dict()
    idx = torch.randint(0, 50, (2, 16))

    fresh = build_model(cfg())
    with pytest.raises(CheckpointError, match="do not fit the model") as info:
        fresh.load_state_dict_flexible(state)  # no adapter registered: the keys do not fit
    assert "\n" not in str(info.value)

    model_base.register_load_adapter(restore_low_rank)
    model_base.register_load_adapter(restore_low_rank)
    assert model_base.LOAD_ADAPTERS == [restore_low_rank]
    fresh = build_model(cfg())
    fresh.load_state_dict_flexible(state)
    torch.testing.assert_close(fresh(idx)[0], trained(idx)[0])
    plain = build_model(cfg())
    plain.load_state_dict_flexible(build_model(cfg()).state_dict())  # an unswapped checkpoint: unchanged
    assert isinstance(plain.target_modules("mlp")["transformer.h.1.mlp.c_fc"], nn.Linear)


def test_swap_module_unknown_name():
    model = build_model(cfg(), device="meta")
    with pytest.raises(ValueError, match="no module named"):
        model.swap_module("transformer.h.9.mlp.c_fc", nn.Identity())


# --------------------------------------------------------------------------------------
# Nothing outside lmkit/models reaches into a family's modules
# --------------------------------------------------------------------------------------


def test_no_code_outside_models_reaches_into_model_modules():
    root = Path(__file__).resolve().parent.parent / "lmkit"
    # attribute access (a leading dot), not state-dict key strings such as "transformer.h.0." in export
    reach_in = re.compile(r"\.(transformer\.(h|wte|wpe|ln_f|drop)\b|lm_head\b|rotary\b)")
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "models":
            continue
        if rel.as_posix() == "export/backpack_remote_modeling.py":
            continue  # the Hugging Face model's own code, copied into exports: its modules, not lmkit's
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            code = re.sub(r"(\"[^\"]*\"|'[^']*')", "''", code)  # drop string literals (state-dict keys)
            if reach_in.search(code) or re.search(r"getattr\([^)]*[\"'](lm_head|transformer)[\"']", line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
